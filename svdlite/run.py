"""A run resolved once.

`RunSpec` is what the user asked for: sampling settings (None = the model preset's default) and the approximate
options. Building it does every check that needs no model (ranges, option pairs, the F3 schedule file, the cache
depth's range), so a bad run is refused before anything loads. `RunSpec.resolve(model)` does the checks that need
the loaded model (size multiple, the F3 schedule's fit to this network and these settings) once and gives a `Run`:
the settings, the noise levels and the per-step `Plan`. Below it, functions trust what they are given.
"""
import dataclasses
import warnings
from dataclasses import dataclass, field, fields

import torch

from . import checks, sampling
from .f3 import F3Schedule, as_schedule, unet_identity
from .plan import Plan, build_plan, check_options, speed_options
from .presets import PRESETS, SamplingConfig
from .unet import UNetConfig

SETTING_KEYS = ("num_frames", "num_inference_steps", "fps", "motion_bucket_id", "noise_aug_strength",
                "min_guidance_scale", "max_guidance_scale", "decode_chunk_size", "height", "width")
# the settings an F3 schedule records and is checked against
F3_SETTING_KEYS = ("num_frames", "height", "width", "min_guidance_scale", "max_guidance_scale", "fps",
                   "motion_bucket_id", "noise_aug_strength")
SVD_OUTPUT_BLOCKS = len(UNetConfig().channel_mult) * (UNetConfig().num_res_blocks + 1)  # every SVD UNet's: 12


@dataclass(frozen=True)
class RunSpec:
    """A run's settings and approximate options as asked (None: the preset's default, or the option's off-position),
    checked when built. `f3_schedule` may be given as a path; it is read here."""

    num_frames: int | None = None
    num_inference_steps: int | None = None
    fps: int | None = None
    motion_bucket_id: float | None = None
    noise_aug_strength: float | None = None
    min_guidance_scale: float | None = None
    max_guidance_scale: float | None = None
    decode_chunk_size: int | None = None
    height: int | None = None
    width: int | None = None
    speed: str = "exact"
    schedule: str | None = None
    sigmas: tuple[float, ...] | None = None
    guidance_cut_step: int | None = None
    f3_schedule: F3Schedule | None = None
    f3_ratio: float | None = None
    f3_statistic: str | None = None
    cache_interval: int | None = None
    cache_depth: int | None = None
    f3_source: str | None = field(default=None, init=False)  # the F3 schedule's file, when given as one

    def __post_init__(self):
        checks.check_settings(**self.settings_given(), guidance_cut_step=self.guidance_cut_step)
        o = self.options()
        check_options(o, self.f3_schedule is not None)
        if o.get("cache_depth") is not None and o["cache_depth"] >= SVD_OUTPUT_BLOCKS:
            raise ValueError(f"cache_depth must be below {SVD_OUTPUT_BLOCKS} (the UNet's output blocks), "
                             f"got {o['cache_depth']}")
        if self.sigmas is not None:  # checked against the step count and schedule, as resolve() will use them
            sigmas, _ = noise_schedule(o.get("num_inference_steps"), o.get("schedule"), self.sigmas)
            object.__setattr__(self, "sigmas", tuple(sigmas.tolist()))
        if self.f3_schedule is not None:
            if not isinstance(self.f3_schedule, F3Schedule):
                object.__setattr__(self, "f3_source", str(self.f3_schedule))
            object.__setattr__(self, "f3_schedule", as_schedule(self.f3_schedule))  # a bad file fails here
            self.f3_schedule.num_skipped(o.get("f3_ratio") or 0.0)

    @classmethod
    def from_options(cls, **options) -> "RunSpec":
        """From keyword options, None meaning not given (the CLI's and `generate`'s form)."""
        unknown = set(options) - set(RUN_KEYS)
        if unknown:
            raise TypeError(f"unknown run options {sorted(unknown)}; expected some of {RUN_KEYS}")
        return cls(**{k: v for k, v in options.items() if v is not None})

    def settings_given(self) -> dict:
        return {k: getattr(self, k) for k in SETTING_KEYS if getattr(self, k) is not None}

    def options(self) -> dict:
        """The approximate options in force: the speed level's, overridden by the given ones (plan.speed_options)."""
        return speed_options(self.speed, {k: getattr(self, k) for k in (
            "num_inference_steps", "schedule", "guidance_cut_step", "f3_ratio", "f3_statistic", "cache_interval",
            "cache_depth")})

    def check_fit(self, model) -> None:
        """Before loading: refuse an F3 schedule made for another frame or step count, as far as the options and
        `model` tell (a preset name's or a loaded model's defaults; a path's are known once loaded)."""
        if self.f3_schedule is None:
            return
        defaults = getattr(model, "sampling", None) or (PRESETS[model].sampling if isinstance(model, str)
                                                        and model in PRESETS else None)
        o = self.options()
        steps = len(self.sigmas) - 1 if self.sigmas is not None else o.get("num_inference_steps")
        if steps is None:
            steps = 10 if o.get("schedule") == "ays" else None if defaults is None else defaults.num_inference_steps
        frames = self.num_frames or (None if defaults is None else defaults.num_frames)
        self.f3_schedule.check_fit({k: v for k, v in (("num_frames", frames), ("num_inference_steps", steps))
                                    if v is not None})

    def resolve(self, model) -> "Run":
        """The model-aware checks, once: settings (preset defaults filled in, size multiple), sigmas and plan."""
        o = self.options()
        sigmas, schedule_name = noise_schedule(o.get("num_inference_steps"), o.get("schedule"), self.sigmas,
                                               model.sampling.num_inference_steps)
        given = self.settings_given() | {"num_inference_steps": len(sigmas) - 1}
        s = dataclasses.replace(model.sampling, **given)
        checks.check_settings(**dataclasses.asdict(s),
                              size_multiple=model.vae_config.downscale * model.unet.config.latent_downscale)
        plan = make_plan(model, s, sigmas, schedule_name=schedule_name, f3_schedule=self.f3_schedule,
                         **{k: o[k] for k in ("guidance_cut_step", "f3_ratio", "f3_statistic", "cache_interval",
                                              "cache_depth") if k in o})
        return Run(self, s, sigmas, schedule_name, plan)

    def record(self) -> dict:
        """The spec as JSON-ready values (a manifest's record): the F3 schedule by its source, sigmas as a list."""
        out = {k: getattr(self, k) for k in RUN_KEYS if getattr(self, k) is not None}
        if self.f3_schedule is not None:
            out["f3_schedule"] = self.f3_source or "(given in memory)"
        if self.sigmas is not None:
            out["sigmas"] = list(self.sigmas)
        return out


RUN_KEYS = tuple(f.name for f in fields(RunSpec) if f.init)  # every keyword a RunSpec takes


@dataclass(frozen=True)
class Run:
    """A `RunSpec` resolved against a loaded model: what every video of the run is made with."""

    spec: RunSpec
    settings: SamplingConfig
    sigmas: torch.Tensor
    schedule_name: str
    plan: Plan

    def f3_settings(self) -> dict:
        """The settings an F3 schedule records and is checked against."""
        return ({k: getattr(self.settings, k) for k in F3_SETTING_KEYS}
                | {"num_inference_steps": self.plan.num_steps, "schedule": self.schedule_name})


def noise_schedule(num_steps: int | None, schedule: str | None = "edm", sigmas=None, default_steps: int = 25
                   ) -> tuple[torch.Tensor, str]:
    """(sigmas (n + 1,) float32 with a final 0, the schedule's name) for a run.

    schedule "edm" (default): the EDM schedule of SVD, num_steps (else default_steps, the preset's) steps. "ays":
    Align Your Steps, 10 steps unless num_steps says otherwise. Explicit `sigmas` (any descending list) override
    both; num_steps must then agree."""
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"num_inference_steps must be a positive int, got {num_steps!r}")
    if sigmas is not None:
        if schedule not in (None, "edm"):
            raise ValueError(f"pass either sigmas or schedule={schedule!r} (a speed level may set it), not both")
        sigmas = sampling.check_sigmas(sigmas)
        if num_steps is not None and num_steps != len(sigmas) - 1:
            raise ValueError(f"num_inference_steps={num_steps} disagrees with the {len(sigmas) - 1} steps of sigmas")
        return sigmas, "custom"
    if schedule in (None, "edm"):
        return sampling.edm_sigmas(default_steps if num_steps is None else num_steps), "edm"
    if schedule == "ays":
        return sampling.ays_sigmas(10 if num_steps is None else num_steps), "ays"
    raise ValueError(f"unknown noise schedule {schedule!r}; expected 'edm' or 'ays' (or pass sigmas=)")


def make_plan(model, s: SamplingConfig, sigmas: torch.Tensor, *, schedule_name: str = "edm",
              guidance_cut_step: int | None = None, f3_schedule=None, f3_ratio: float | None = 0.0,
              f3_statistic: str | None = "attention", cache_interval: int | None = 1,
              cache_depth: int | None = None) -> Plan:
    """The one per-step plan for these options (plan.py), checked by `RunSpec` before; checks an F3 schedule
    against the model and settings. None means the option's off-position (f3_ratio 0, f3_statistic "attention",
    cache_interval 1)."""
    f3_ratio = 0.0 if f3_ratio is None else f3_ratio
    f3_statistic = "attention" if f3_statistic is None else f3_statistic
    cache_interval = 1 if cache_interval is None else cache_interval
    skip = None
    if f3_schedule is not None:
        f3_schedule = as_schedule(f3_schedule)
        settings = ({k: getattr(s, k) for k in F3_SETTING_KEYS}
                    | {"num_inference_steps": len(sigmas) - 1, "schedule": schedule_name})
        identity = unet_identity(model.unet) if f3_schedule.model else None  # read from the weights: only when
        for message in f3_schedule.check(model.unet.temporal_units(), identity, settings):  # there is one to match
            warnings.warn(message, stacklevel=4)
        skip = f3_schedule.skip_sets(f3_ratio, f3_statistic)
    if cache_depth is not None and cache_depth >= len(model.unet.output_blocks):
        raise ValueError(f"cache_depth must be below {len(model.unet.output_blocks)} (the UNet's output blocks), "
                         f"got {cache_depth}")
    return build_plan(sigmas, guidance=s.max_guidance_scale > 1, guidance_cut_step=guidance_cut_step,
                      skip_temporal=skip, cache_interval=cache_interval, cache_depth=cache_depth)
