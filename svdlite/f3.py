"""F3-Pruning for SVD: the calibrated schedule of temporal-attention units, its file and its ranking.

Su et al., "F3-Pruning: A Training-Free and Generalized Pruning Strategy towards Faster and Finer Text-to-Video
Synthesis", AAAI 2024, prunes temporal attention whose aggregate attention value ranks below a ratio. svdlite's
port (docs/papers.md "F3-Pruning"; our design, the paper has no SVD version): a unit is one temporal transformer block
(`...time_stack.d`, 16 in SVD) at one denoising step. A calibration run (`svdlite.calibrate_f3`) records per unit
  - "attention": the mass a frame's query puts on the OTHER frames in the block's temporal self-attention
    (1 - the softmax map's diagonal), averaged over images, heads, positions, query frames and both guidance
    halves: the F3 statistic, and the default ranking;
  - "contribution": (1 - alpha) * ||temporal - spatial|| / ||spatial||, the temporal branch's relative share of
    the blended block output (alpha = sigmoid(mix_factor), the block's own blend factor).
`F3Schedule.skip_sets(r)` ranks all units by one statistic and skips the lowest round(r * units): a skipped unit's
temporal block does not run and the blend keeps the spatial path (alpha = 1).

The file is JSON: format and version, the units, both statistics per step and unit, the calibration settings,
and the UNet's identity (per-tensor RMS values, equal across float32/float16/bfloat16 copies of the same weights
to within their rounding), so a schedule used with another model, frame count or step count is refused.
"""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT, VERSION = "svdlite-f3-schedule", 1
STATISTICS = ("attention", "contribution")
REFUSED = ("num_frames", "num_inference_steps")  # a mismatch here refuses the schedule; other settings warn
WARNED = ("height", "width", "min_guidance_scale", "max_guidance_scale", "fps", "motion_bucket_id",
          "noise_aug_strength", "schedule")
# RMS of a tensor moves by at most 2^-9 relative when its weights are rounded to bfloat16 (2^-12 for float16);
# independently drawn or trained weights differ by far more in some tensor (the 1-element mix factors alone).
IDENTITY_RTOL = 4e-3


def unet_identity(unet: torch.nn.Module) -> dict:
    """The UNet's identity: tensor count, parameter count and each state-dict tensor's RMS (float32), in order."""
    sd = unet.state_dict()
    rms = [t.detach().float().pow(2).mean().sqrt().item() if t.numel() else 0.0 for t in sd.values()]
    return {"tensors": len(sd), "parameters": sum(t.numel() for t in sd.values()),
            "rms": [float(f"{v:.7g}") for v in rms]}


def identity_difference(a: dict, b: dict) -> str | None:
    """Why two identities are different models (None when they are the same weights, up to dtype rounding)."""
    if (a["tensors"], a["parameters"]) != (b["tensors"], b["parameters"]):
        return (f"a network of {a['tensors']} tensors / {a['parameters']:,} parameters, not {b['tensors']} / "
                f"{b['parameters']:,}")
    worst = max((abs(x - y) / max(abs(x), abs(y), 1e-12), i) for i, (x, y) in enumerate(zip(a["rms"], b["rms"])))
    if worst[0] > IDENTITY_RTOL:
        return f"other weights (tensor #{worst[1]}'s RMS differs by {worst[0]:.1%}, more than dtype rounding)"
    return None


def _num(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class F3Schedule:
    """Calibrated F3 statistics: stats[statistic][step][unit], the units' UNet paths, the settings and model id."""

    units: tuple[str, ...]
    stats: dict[str, tuple[tuple[float, ...], ...]]
    settings: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.units or len(set(self.units)) != len(self.units):
            raise ValueError(f"F3Schedule needs distinct unit names, got {list(self.units)[:4]}")
        if set(self.stats) != set(STATISTICS):
            raise ValueError(f"F3Schedule needs the statistics {STATISTICS}, got {sorted(self.stats)}")
        shapes = {name: (len(rows), {len(r) for r in rows}) for name, rows in self.stats.items()}
        steps = shapes["attention"][0]
        for name, (n, widths) in shapes.items():
            if n != steps or n < 1 or widths != {len(self.units)}:
                raise ValueError(f"F3Schedule statistic {name!r} must be {steps or 'n'} steps x {len(self.units)} "
                                 f"units, got {n} steps with rows of {sorted(widths)}")
        object.__setattr__(self, "stats", {k: tuple(tuple(_num(v, f"{k} value") for v in row) for row in rows)
                                           for k, rows in self.stats.items()})

    @property
    def num_steps(self) -> int:
        return len(self.stats["attention"])

    @property
    def num_units(self) -> int:
        """Units in the ranking: temporal blocks x steps."""
        return self.num_steps * len(self.units)

    def ranking(self, statistic: str = "attention") -> list[tuple[int, str]]:
        """All (step, unit) pairs, lowest statistic first (ties: earlier step, then earlier unit)."""
        if statistic not in STATISTICS:
            raise ValueError(f"unknown F3 statistic {statistic!r}; expected one of {STATISTICS}")
        rows = self.stats[statistic]
        order = sorted((rows[i][j], i, j) for i in range(self.num_steps) for j in range(len(self.units)))
        return [(i, self.units[j]) for _, i, j in order]

    def num_skipped(self, ratio: float) -> int:
        """round(ratio * units), halves rounded up."""
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"f3_ratio must be a number in [0, 1), got {ratio!r}")
        return math.floor(ratio * self.num_units + 0.5)

    def skip_sets(self, ratio: float, statistic: str = "attention") -> list[frozenset[str]]:
        """Per step, the temporal units to skip: the lowest-ranked round(ratio * units) (step, unit) pairs."""
        pruned = self.ranking(statistic)[:self.num_skipped(ratio)]
        return [frozenset(u for i, u in pruned if i == step) for step in range(self.num_steps)]

    def check(self, unet_units: list[str], identity: dict | None, settings: dict) -> list[str]:
        """Refuse (ValueError naming the difference) a schedule made for another network, model, frame count or
        step count; return warnings for other settings that differ."""
        if list(self.units) != list(unet_units):
            raise ValueError(f"the F3 schedule's units ({len(self.units)}: {list(self.units)[:2]} ...) are not this "
                             f"network's temporal blocks ({len(unet_units)}: {list(unet_units)[:2]} ...)")
        if identity is not None and self.model:
            why = identity_difference(self.model, identity)
            if why:
                raise ValueError(f"the F3 schedule was calibrated on another model: it describes {why}; calibrate "
                                 "one for this model (svdlite calibrate)")
        self.check_fit(settings)
        return [f"F3 schedule calibrated with {k}={self.settings[k]!r}, this run uses {settings[k]!r}"
                for k in WARNED if k in settings and k in self.settings and settings[k] != self.settings[k]]

    def check_fit(self, settings: dict) -> None:
        """Refuse (ValueError) a schedule calibrated for another frame or step count than `settings` gives; keys
        absent from `settings` are not checked (before loading, only the given ones and a preset's are known)."""
        for key in REFUSED:
            if key in settings and key in self.settings and settings[key] != self.settings[key]:
                raise ValueError(f"the F3 schedule was calibrated with {key}={self.settings[key]}, this run uses "
                                 f"{settings[key]}; calibrate one for these settings")

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "units": list(self.units), "settings": self.settings,
                "model": self.model, "stats": {k: [list(r) for r in v] for k, v in self.stats.items()}}

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write the JSON file atomically (temporary file, then rename); refuses to overwrite unless asked."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --force) to replace it")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
        tmp = path.with_name(f".{path.name}.partial")
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=1))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def from_json(cls, data, source: str = "F3 schedule") -> "F3Schedule":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source} is not an svdlite F3 schedule (no \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise ValueError(f"{source} has schedule version {data.get('version')!r}; this svdlite reads {VERSION}")
        missing = [k for k in ("units", "stats", "settings", "model") if k not in data]
        if missing:
            raise ValueError(f"{source} lacks {missing}")
        try:
            stats = {k: tuple(tuple(r) for r in v) for k, v in data["stats"].items()}
            return cls(tuple(data["units"]), stats, dict(data["settings"]), dict(data["model"]))
        except (TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"{source} is malformed: {err}") from None

    @classmethod
    def load(cls, path) -> "F3Schedule":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"F3 schedule {path} not found")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"F3 schedule {path} is not valid JSON (truncated or not a schedule?): {err}") from None
        return cls.from_json(data, f"F3 schedule {path}")


def as_schedule(schedule) -> F3Schedule:
    """An F3Schedule from itself or a path to its file."""
    if isinstance(schedule, F3Schedule):
        return schedule
    if isinstance(schedule, (str, os.PathLike)):
        return F3Schedule.load(schedule)
    raise TypeError(f"f3_schedule must be an F3Schedule or a path to its JSON file, got {type(schedule).__name__}")
