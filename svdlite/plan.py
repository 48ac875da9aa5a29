"""The acceleration plan: what runs at each denoising step, decided before sampling (docs/design.md).

Every way svdlite trades work for speed is a per-step decision known before the loop starts:
- the guidance cut: both classifier-free-guidance halves, or only the conditional one (`Step.guided`);
- F3-Pruning: which temporal transformer blocks do not run (`Step.skip_temporal`, unit paths of the UNet);
- step caching (DeepCache): a full step that refreshes the cached deep features, or a partial step that runs only
  the shallow branch and reuses them (`Step.cache`, with `Plan.cache_depth`);
- the noise schedule (`Plan.sigmas`: which noise levels, how many steps).
One `Plan` holds them all. The sampler loop reads it, the UNet receives a step's entries as explicit arguments,
`tools/count_macs.py` counts its work, and `Plan.describe()` prints it. The exact plan (every step guided, nothing
skipped, no cache) reproduces the plain run bit for bit.
"""
from dataclasses import dataclass

import torch

CACHE_MODES = (None, "refresh", "reuse")
# Named, tested combinations of the options (`generate(speed=...)`, `--speed`); options given explicitly win.
# MACs per SVD-XT video at its defaults (30 steps, 25 frames, 1024x576; tools/count_macs.py --speed): exact 100%,
# balanced 54.3%, fast 33.3%. Chosen as the combinations meeting 60% / 35% that moved the output least in
# tools/measure_options.py (README; random weights: DeepCache's N = 3, D = 1 costs 49.9% but moved it more).
# step caching's depth when only the interval is given: 0 recomputes only the shallowest branch (input block 0 and
# the last output block) at reusing steps, the most work saved; it is the depth of the "balanced" level, whose speed
# and deviation are measured (README)
DEFAULT_CACHE_DEPTH = 0
SPEED_LEVELS = {
    "exact": {},
    "balanced": {"cache_interval": 2, "cache_depth": 0},  # every other step runs only the shallowest branch
    "fast": {"schedule": "ays", "num_inference_steps": 10},  # Align Your Steps' 10 noise levels
}


def check_int(name: str, value, low: int) -> None:
    """A ValueError naming the option unless `value` is an int (not a bool) >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_cache(interval, depth) -> None:
    """Step caching's pair: interval N >= 1 (1 = no caching), depth D >= 0 or None, and a depth whenever N > 1."""
    check_int("cache_interval", interval, 1)
    if depth is not None:
        check_int("cache_depth", depth, 0)
    if interval > 1 and depth is None:
        raise ValueError("cache_interval > 1 needs a cache_depth")


def check_options(options: dict, has_f3_schedule: bool) -> None:
    """Refuse bad values of the approximate options before any work (the rest is checked with the model: step
    counts, the F3 schedule's fit, the cache depth's range). None means not set."""
    ratio, statistic = options.get("f3_ratio"), options.get("f3_statistic")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1):
        raise ValueError(f"f3_ratio must be a number in [0, 1), got {ratio!r}")
    if ratio and not has_f3_schedule:
        raise ValueError(f"f3_ratio={ratio!r} needs an f3_schedule (make one with svdlite calibrate)")
    if statistic is not None and statistic not in ("attention", "contribution"):
        raise ValueError(f"unknown f3_statistic {statistic!r}; expected 'attention' or 'contribution'")
    if options.get("guidance_cut_step") is not None:
        check_int("guidance_cut_step", options["guidance_cut_step"], 0)
    interval = options.get("cache_interval")
    check_cache(1 if interval is None else interval, options.get("cache_depth"))
    if options.get("schedule") not in (None, "edm", "ays"):
        raise ValueError(f"unknown noise schedule {options['schedule']!r}; expected 'edm' or 'ays' (or pass sigmas=)")


def speed_options(speed: str, options: dict) -> dict:
    """The options of a `speed` level, overridden by the explicitly given (non-None) ones; step caching without a
    depth gets `DEFAULT_CACHE_DEPTH`."""
    if speed not in SPEED_LEVELS:
        raise ValueError(f"unknown speed {speed!r}; expected one of {list(SPEED_LEVELS)}")
    o = SPEED_LEVELS[speed] | {k: v for k, v in options.items() if v is not None}
    if o.get("cache_depth") is None and isinstance(o.get("cache_interval"), int) and o["cache_interval"] > 1:
        o["cache_depth"] = DEFAULT_CACHE_DEPTH
    return o


@dataclass(frozen=True)
class Step:
    """What runs at denoising step `index` (noise level `sigma`)."""

    index: int
    sigma: float
    guided: bool  # one UNet call on [uncond; cond] (2 x frames rows), else on the conditional half only
    skip_temporal: frozenset[str] = frozenset()  # temporal units that do not run (F3)
    cache: str | None = None  # None: no caching; "refresh": full UNet, keep deep features; "reuse": shallow only

    def __post_init__(self):
        if self.cache not in CACHE_MODES:
            raise ValueError(f"Step.cache must be one of {CACHE_MODES}, got {self.cache!r}")


@dataclass(frozen=True)
class Plan:
    """sigmas: the n + 1 noise levels (float32 values, descending, the last 0); steps: n `Step`s."""

    sigmas: tuple[float, ...]
    steps: tuple[Step, ...]
    cache_depth: int | None = None  # the recomputed branch of a "reuse" step (VideoUNet.forward's cache_depth)

    def __post_init__(self):
        if len(self.sigmas) != len(self.steps) + 1:
            raise ValueError(f"a plan of {len(self.steps)} steps needs {len(self.steps) + 1} sigmas, "
                             f"got {len(self.sigmas)}")
        if any(s.cache for s in self.steps) and self.cache_depth is None:
            raise ValueError("a plan with cached steps needs a cache_depth")
        for prev, step in zip((None,) + self.steps, self.steps):
            if step.cache == "reuse" and (prev is None or prev.cache is None or (step.guided and not prev.guided)):
                raise ValueError(f"step {step.index} reuses cached features, but the step before it keeps none "
                                 "for its batch (a reuse must follow a refresh or a reuse, and cannot go from the "
                                 "conditional half back to both)")

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def is_exact(self) -> bool:
        """True when nothing is traded: every step guided (or guidance off), nothing skipped or cached."""
        return all(not s.skip_temporal and s.cache is None for s in self.steps) and len(
            {s.guided for s in self.steps}) <= 1

    def sigmas_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(self.sigmas, dtype=torch.float32, device=device)

    def describe(self, num_units: int | None = None) -> list[str]:
        """One line per step: sigma, which halves run, skipped temporal units, cache mode."""
        lines = []
        for s in self.steps:
            units = f"{len(s.skip_temporal)}" + (f"/{num_units}" if num_units else "")
            lines.append(f"step {s.index:>3}  sigma {s.sigma:>10.4f}  {'guided' if s.guided else 'cond-only':<9}  "
                         f"temporal skipped {units:<6}  cache {s.cache or '-'}")
        return lines


def build_plan(sigmas: torch.Tensor, *, guidance: bool, guidance_cut_step: int | None = None,
               skip_temporal: list[frozenset[str]] | None = None, cache_interval: int = 1,
               cache_depth: int | None = None) -> Plan:
    """The per-step plan for these options; with the defaults every step runs everything (the exact plan).

    Args:
        sigmas: (n + 1,) descending noise levels, the last 0 (from `sampling.edm_sigmas` or `sampling.ays_sigmas`).
        guidance: whether classifier-free guidance runs at all (diffusers/sgm skip it when max guidance <= 1).
        guidance_cut_step: K in [0, n]: steps K.. run only the conditional half; None or n = never.
        skip_temporal: per step, the temporal units not to run (from `F3Schedule.skip_sets`); None = none.
        cache_interval: N >= 1; every N-th step (0, N, 2N, ...) runs the whole UNet and refreshes the cache, the
            N - 1 steps after it reuse it. N = 1 is exact (no caching).
        cache_depth: D, the branch a reusing step recomputes: input_blocks 0..D and the last D + 1 output blocks.
    """
    n = len(sigmas) - 1
    if n < 1:
        raise ValueError(f"need at least 2 sigmas (1 step), got {len(sigmas)}")
    if guidance_cut_step is not None and (isinstance(guidance_cut_step, bool) or not 0 <= guidance_cut_step <= n):
        raise ValueError(f"guidance_cut_step must be in [0, {n}] (the step count), got {guidance_cut_step!r}")
    if skip_temporal is not None and len(skip_temporal) != n:
        raise ValueError(f"skip_temporal must give one set per step ({n}), got {len(skip_temporal)}")
    check_cache(cache_interval, cache_depth)
    cut = n if guidance_cut_step is None else guidance_cut_step
    values = tuple(float(s) for s in sigmas)
    steps = []
    for i in range(n):
        cache = None if cache_interval == 1 else ("refresh" if i % cache_interval == 0 else "reuse")
        steps.append(Step(i, values[i], guidance and i < cut,
                          frozenset() if skip_temporal is None else frozenset(skip_temporal[i]), cache))
    return Plan(values, tuple(steps), cache_depth if cache_interval > 1 else None)
