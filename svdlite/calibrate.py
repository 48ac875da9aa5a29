"""F3 calibration: sample a few images with the exact plan and record every temporal unit's statistics (f3.py)."""
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checks
from .components import SVDModel, load_model
from .f3 import STATISTICS, F3Schedule, unet_identity
from .image import open_image
from .pipeline import sample
from .run import SETTING_KEYS, RunSpec
from .seeds import make_generator, random_seed
from .version import __version__


@torch.no_grad()
def calibrate_f3(images, *, model="svd-xt", seed: int | None = None, schedule: str | None = None, sigmas=None,
                 device=None, dtype=None, progress: bool = True, token: str | None = None,
                 spec: RunSpec | None = None, **settings) -> F3Schedule:
    """Sample each image with the exact plan and average the F3 statistics of every (step, temporal unit).

    Args:
        images: paths, PIL images or tensors, as `generate` takes them (one is enough; more average out).
        model: an `SVDModel` or anything `load_model` takes; device and dtype as in `generate`.
        seed: image k is sampled with seed + k (noise augmentation and initial latents, as in `generate`); None: a
            random one (`seeds.random_seed`), recorded in the schedule's settings.
        schedule, sigmas: the noise schedule, as in `generate`; the step count must match later runs.
        settings: `generate`'s sampling settings (num_frames, num_inference_steps, fps, motion_bucket_id,
            noise_aug_strength, min_guidance_scale, max_guidance_scale, height, width); unset ones are the preset's.
        spec: a `RunSpec` instead of schedule, sigmas and settings; it must hold no approximate option.
    Returns:
        The schedule: for every step and unit, "attention" and "contribution" averaged over the images (and, within
        a call, over heads, every spatial position, query frames and both guidance halves), the settings and the
        UNet's identity. Save it with `.save(path)`.
    """
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError("calibrate_f3 needs at least one image")
    if seed is None:
        seed = random_seed()
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64 - len(images):
        raise ValueError(f"seed must be an int in [0, 2**64 - {len(images)}) (image k uses seed + k), got {seed!r}")
    unknown = set(settings) - set(SETTING_KEYS)
    if unknown:
        raise TypeError(f"calibrate_f3 got unknown settings {sorted(unknown)}")
    if spec is None:
        spec = RunSpec.from_options(**settings, schedule=schedule, sigmas=sigmas)
    elif settings or schedule is not None or sigmas is not None:
        raise ValueError("pass the settings either in spec or as keywords, not both")
    approximate = {k: v for k, v in spec.options().items() if k not in ("num_inference_steps", "schedule")}
    if approximate:
        raise ValueError(f"calibration runs the exact computation; got approximate options {approximate}")
    images = [open_image(i) if isinstance(i, (str, Path)) else i for i in images]  # bad files fail before loading
    device, dtype = (None if device == "auto" else device), (None if dtype == "auto" else dtype)
    if not isinstance(model, SVDModel):
        model = load_model(model, device=device or "auto", dtype=dtype or "auto", token=token, progress=progress)
    device, dtype = checks.model_device_dtype(model.unet, device, dtype)
    run = spec.resolve(model)  # the exact plan: every unit runs at every step
    units = model.unet.temporal_units()
    totals = {name: torch.zeros(run.plan.num_steps, len(units), dtype=torch.float64) for name in STATISTICS}
    for k, image in enumerate(tqdm(images, desc="calibrating", unit="image", disable=not progress or len(images) < 2)):
        record: dict = {}
        sample(model, image, run.settings, run.plan, generator=make_generator(seed + k, None), device=device,
               dtype=dtype, progress=progress, record=record)
        for step, per_unit in record.items():
            for j, unit in enumerate(units):
                for name in STATISTICS:
                    totals[name][step, j] += per_unit[unit][name]
    stats = {name: tuple(tuple(row) for row in (t / len(images)).tolist()) for name, t in totals.items()}
    settings_out = run.f3_settings() | {
        "seed": seed, "images": len(images), "dtype": str(dtype).replace("torch.", ""), "svdlite": __version__,
        "model_source": model.source}
    return F3Schedule(tuple(units), stats, settings_out, unet_identity(model.unet))
