"""Image to video: `generate(image, model=..., ...)`, the whole of docs/model.md "End to end".

Argument names follow diffusers' `StableVideoDiffusionPipeline`; defaults come from the model's preset. With the
same weights, image, `latents` (or seed) and settings, the frames equal diffusers' (tests/test_pipeline_diffusers.py).
Randomness comes only from one CPU `torch.Generator` per video, drawn in diffusers' order: the condition image's
noise augmentation, then the initial latents. The run's settings and options are a `RunSpec` (run.py), checked
before the model loads and resolved against it once.
"""
import math
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checks, sampling
from .components import SVDModel, load_model
from .conditioning import condition
from .denoiser import make_denoiser
from .image import open_image
from .memory import decode_chunk_for, gpu_free_bytes
from .offload import check_offload, placed
from .presets import SamplingConfig
from .run import Run, RunSpec
from .plan import Plan
from .seeds import make_generators, per_image
from .vae import decode_latents
from .video import Video, to_uint8_frames


@torch.no_grad()
def generate(image, *, model="svd-xt", num_frames: int | None = None, num_inference_steps: int | None = None,
             fps: int | None = None, motion_bucket_id: int | None = None, noise_aug_strength: float | None = None,
             min_guidance_scale: float | None = None, max_guidance_scale: float | None = None,
             decode_chunk_size: int | None = None, height: int | None = None, width: int | None = None,
             seed: int | None = None, generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
             guidance_cut_step: int | None = None, f3_schedule=None, f3_ratio: float | None = None,
             f3_statistic: str | None = None, cache_interval: int | None = None, cache_depth: int | None = None,
             schedule: str | None = None, sigmas=None, speed: str = "exact", device=None,
             dtype: torch.dtype | None = None, progress: bool = True, token: str | None = None,
             batch_size: int = 1, spec: RunSpec | None = None, offload: str | None = None) -> Video | list[Video]:
    """Generate a video from one image, or a list of videos from a list of images. Unset arguments take the
    preset's defaults (`model.sampling`).

    image: a path, PIL image or (3, H, W) tensor in [0, 1] -> one `Video`; a list of them -> a list of `Video`s, made
      `batch_size` at a time (each UNet evaluation runs the rows of up to batch_size videos, both guidance halves;
      a video does not depend on its batch beyond float32 noise, README "Many images").
    model: an `SVDModel` from `load_model`, or anything `load_model` takes (preset name, file, folder).
    device, dtype: where and in which precision the UNet and CLIP run; by default a loaded model's own, else
        "auto": the GPU when torch sees one (else the CPU), float16 on a GPU and float32 on the CPU. A loaded model
        is never moved or cast: asking for another device or dtype is an error.
    seed: for a list, one int per image, or one int s: image k then gets seed s + k. None: a random one
        (`seeds.random_seed`). Each `Video` records its seed.
    generator, latents: for a list, one per image (a list), or None.
    fps: the frame rate; the model is conditioned on fps - 1 (fps=7 reproduces sgm's official script).
    latents: the initial noise at unit variance, (num_frames, 4, height/8, width/8), or (1, num_frames, ...) as
        diffusers takes it.
    Approximate options (all off by default, each off-position exact; they form one per-step plan, plan.py):
      guidance_cut_step: from this step on only the conditional branch runs;
      f3_schedule, f3_ratio, f3_statistic: F3-Pruning, skip the lowest-ranked ratio of the calibrated temporal
        units (`calibrate_f3`; f3.py);
      cache_interval, cache_depth: step caching (DeepCache), the deep features reused for N - 1 of every N steps;
      schedule ("edm" | "ays") or sigmas: the noise schedule ("ays": Align Your Steps, 10 steps by default);
      speed ("exact" | "balanced" | "fast"): a named combination of these (plan.SPEED_LEVELS); options given
        explicitly override its choices.
    spec: a `RunSpec` holding the settings and options instead of the keywords above (then leave those unset).
    offload: "model" keeps the networks in CPU memory and moves each to `device` (default: the GPU) only while it
        works (offload.py); the model must then be loaded on the CPU. None (default): everything on the model's
        device.
    Returns a `Video` (uint8 frames, fps, seed) whose `latents` are the final denoised latents (a list for a list).
    Settings, options, images and device are checked before the model is loaded; non-finite values stop the run.
    """
    given = dict(num_frames=num_frames, num_inference_steps=num_inference_steps, fps=fps,
                 motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength,
                 min_guidance_scale=min_guidance_scale, max_guidance_scale=max_guidance_scale,
                 decode_chunk_size=decode_chunk_size, height=height, width=width, schedule=schedule, sigmas=sigmas,
                 guidance_cut_step=guidance_cut_step, f3_schedule=f3_schedule, f3_ratio=f3_ratio,
                 f3_statistic=f3_statistic, cache_interval=cache_interval, cache_depth=cache_depth)
    if spec is None:
        spec = RunSpec.from_options(**given, speed=speed)  # every model-free check, before anything loads
    elif any(v is not None for v in given.values()) or speed != "exact":
        raise ValueError("pass the settings and options either in spec or as keywords, not both")
    spec.check_fit(model)
    for seed_k in seed if isinstance(seed, (list, tuple)) else [seed]:  # one seed, or one per image
        checks.check_settings(seed=seed_k)
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_offload(offload)
    batched = isinstance(image, (list, tuple))
    images = [open_image(im) if isinstance(im, (str, Path)) else im  # a bad file fails here, before loading
              for im in (image if batched else [image])]
    device, dtype = (None if device == "auto" else device), (None if dtype == "auto" else dtype)
    compute = checks.resolve_device(device or "auto") if offload else None  # where each network works in turn
    if not isinstance(model, SVDModel):
        model = load_model(model, device="cpu" if offload else device or "auto",
                           dtype=checks.resolve_dtype(dtype or "auto", compute) if offload else dtype or "auto",
                           token=token, progress=progress)
    checks.model_device_dtype(model.unet, "cpu" if offload else device, dtype)
    run = spec.resolve(model)
    seeds, generators = make_generators(len(images), seed, generator, batched)
    videos = make_videos(model, images, run, seeds, generators, per_image(latents, len(images), batched, "latents"),
                         batch_size=batch_size, progress=progress, offload_to=compute)
    return videos if batched else videos[0]


def make_videos(model: SVDModel, images: list, run: Run, seeds: list, generators: list, latents: list, *,
                batch_size: int = 1, progress: bool = False, offload_to: torch.device | None = None) -> list[Video]:
    """The videos of `images` with a resolved run, `batch_size` videos per UNet evaluation (the path `generate` and
    `svdlite batch` share; everything here was checked before). offload_to: the device each network is moved to
    while it works (model offload), or None: the model's own."""
    dev, dtype = checks.model_device_dtype(model.unet)
    dev = offload_to or dev
    s, t, videos = run.settings, run.settings.num_frames, []
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        x = sample(model, images[part], s, run.plan, generator=generators[part], latents=latents[part], device=dev,
                   dtype=dtype, progress=progress, offload=offload_to is not None)
        checks.check_finite(x, "the latents after sampling", f"the UNet ran in {dtype}: try float32 (CLI: --dtype "
                            "fp32) or bf16, and check the UNet weights for NaN/inf")
        with placed([model.vae_decoder], dev, offload_to is not None):
            chunk = s.decode_chunk_size
            if run.spec.decode_chunk_size is None:  # not given: what the GPU's free memory allows (memory.py)
                free = gpu_free_bytes(dev)
                chunk = decode_chunk_for(free, s.height, s.width, chunk)
                if chunk < s.decode_chunk_size:
                    warnings.warn(f"decoding {chunk} frame(s) at a time instead of {s.decode_chunk_size}: the GPU has "
                                  f"{free / 2**30:.1f} GiB free; pass decode_chunk_size (CLI: --decode-chunk-size) to "
                                  "choose", stacklevel=3)
            decoded = decode(model, x, t, chunk, progress)
        checks.check_finite(decoded, "the decoded frames", "the VAE decoder (float32) produced them from finite "
                            "latents: its weights hold NaN/inf (corrupt file?)")
        frames = to_uint8_frames(decoded)
        videos += [Video(frames[k * t:(k + 1) * t], float(s.fps), latents=x[k * t:(k + 1) * t].cpu(), seed=seed_k)
                   for k, seed_k in enumerate(seeds[part])]
    return videos


def sample(model: SVDModel, image, s: SamplingConfig, plan: Plan, *, generator: torch.Generator,
           latents: torch.Tensor | None = None, device="cpu", dtype: torch.dtype = torch.float32,
           progress: bool = False, record: dict | None = None, offload: bool = False) -> torch.Tensor:
    """Condition on the image(s) and run the plan's sampling loop: the final latents ((b t), 4, h/8, w/8), fp32.

    image: one image, or a list of b images (videos sampled together as `(b t)` rows); then `generator` and
        `latents` are lists of b too, one per video, each generator drawn in the one-video order (the condition
        image's noise augmentation, then the initial latents).
    record: a dict that receives {step: {unit: {"attention", "contribution"}}} (F3 calibration).
    offload: move CLIP and the VAE encoder to `device` while conditioning, the UNet while sampling, back after."""
    dev = torch.device(device)
    batched = isinstance(image, (list, tuple))
    images = list(image) if batched else [image]
    generators = per_image(generator, len(images), batched, "generator")
    noises = per_image(latents, len(images), batched, "latents")
    with placed([model.image_encoder, model.vae_encoder], dev, offload):
        batch, latents = condition(model, images, s, generators, noises, dev)
    sigmas = plan.sigmas_tensor(dev)
    x = sampling.initial_latents(latents, sigmas)
    with placed([model.unet], dev, offload), tqdm(total=plan.num_steps, desc="denoising", disable=not progress) as bar:
        denoise = make_denoiser(model, batch, s.num_frames, s.min_guidance_scale, s.max_guidance_scale,
                                plan.cache_depth, dtype, record)
        return sampling.sample_euler_edm(denoise, x, sigmas, steps=plan.steps, callback=lambda info: bar.update(1))


def decode(model: SVDModel, latents: torch.Tensor, num_frames: int, chunk_size: int, progress: bool = False):
    """Final latents -> frames in [-1, 1] (float32 VAE, chunks of `chunk_size` frames), with a progress bar."""
    chunks = math.ceil(num_frames / chunk_size) * (latents.shape[0] // num_frames)
    with tqdm(total=chunks, desc="decoding", disable=not progress) as bar:
        def decoder(z, n):
            out = model.vae_decoder(z, n)
            bar.update(1)
            return out
        return decode_latents(decoder, latents.float(), num_frames, chunk_size, model.vae_config.scale_factor)
