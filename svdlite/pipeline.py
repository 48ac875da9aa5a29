"""Image to video: `generate(image, model=..., ...)`, the whole of docs/model.md "End to end".

Argument names follow diffusers' `StableVideoDiffusionPipeline`; defaults come from the model's preset. With the
same weights, image, `latents` (or seed) and settings, the frames equal diffusers' (tests/test_pipeline_diffusers.py).
Randomness comes only from one CPU `torch.Generator`, drawn in diffusers' order: the condition image's noise
augmentation, then the initial latents.
"""
import dataclasses
import math
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checks, sampling
from .clip import encode_image
from .components import SVDModel, load_model
from .conditioning import augment_condition_image, cfg_batch, fps_id_from_fps, micro_conditioning
from .f3 import as_schedule, unet_identity
from .image import load_image, open_image
from .plan import Plan, Step, build_plan, check_options, speed_options
from .presets import PRESETS, SamplingConfig
from .seeds import random_seed
from .unet import UNetConfig
from .vae import decode_latents
from .video import Video, to_uint8_frames


def resolve_settings(model: SVDModel, **overrides) -> SamplingConfig:
    """The preset's sampling defaults with the given (non-None) values in their place, checked against the model."""
    s = dataclasses.replace(model.sampling, **{k: v for k, v in overrides.items() if v is not None})
    checks.check_settings(**dataclasses.asdict(s),
                          size_multiple=model.vae_config.downscale * model.unet.config.latent_downscale)
    return s


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


def check_before_loading(model, *, f3_schedule=None, speed: str = "exact", seed=None, schedule: str | None = None,
                         guidance_cut_step: int | None = None, f3_ratio: float | None = None,
                         f3_statistic: str | None = None, cache_interval: int | None = None,
                         cache_depth: int | None = None, **settings):
    """Every check of a run's settings and options that needs no loaded model; returns the F3 schedule, read.

    model: what will be loaded (a preset name, whose sampling defaults are known, a path, or an `SVDModel`).
    settings: `generate`'s sampling settings (None = the preset's). An F3 schedule calibrated for another frame or
    step count than the run's (as far as the settings and a preset's defaults tell) is refused here."""
    checks.check_settings(**settings, seed=seed, guidance_cut_step=guidance_cut_step)
    o = speed_options(speed, dict(num_inference_steps=settings.get("num_inference_steps"), schedule=schedule,
                                  guidance_cut_step=guidance_cut_step, f3_ratio=f3_ratio, f3_statistic=f3_statistic,
                                  cache_interval=cache_interval, cache_depth=cache_depth))
    check_options(o, f3_schedule is not None)
    blocks = len(UNetConfig().channel_mult) * (UNetConfig().num_res_blocks + 1)  # every SVD UNet's output blocks
    if o.get("cache_depth") is not None and o["cache_depth"] >= blocks:
        raise ValueError(f"cache_depth must be below {blocks} (the UNet's output blocks), got {o['cache_depth']}")
    if f3_schedule is None:
        return None
    f3_schedule = as_schedule(f3_schedule)  # a bad file fails here
    f3_schedule.num_skipped(o.get("f3_ratio") or 0.0)
    defaults = model.sampling if isinstance(model, SVDModel) else (
        PRESETS[model].sampling if isinstance(model, str) and model in PRESETS else None)
    steps = o.get("num_inference_steps")
    if steps is None:
        steps = 10 if o.get("schedule") == "ays" else None if defaults is None else defaults.num_inference_steps
    frames = settings.get("num_frames") or (None if defaults is None else defaults.num_frames)
    f3_schedule.check_fit({k: v for k, v in (("num_frames", frames), ("num_inference_steps", steps)) if v is not None})
    return f3_schedule


def make_plan(model: SVDModel, s: SamplingConfig, sigmas: torch.Tensor, *, schedule_name: str = "edm",
              guidance_cut_step: int | None = None, f3_schedule=None, f3_ratio: float | None = 0.0,
              f3_statistic: str | None = "attention", cache_interval: int | None = 1,
              cache_depth: int | None = None) -> Plan:
    """The one per-step plan for these options (plan.py); checks an F3 schedule against the model and settings.
    None means the option's off-position (f3_ratio 0, f3_statistic "attention", cache_interval 1)."""
    f3_ratio = 0.0 if f3_ratio is None else f3_ratio
    f3_statistic = "attention" if f3_statistic is None else f3_statistic
    cache_interval = 1 if cache_interval is None else cache_interval
    check_options({"f3_ratio": f3_ratio, "f3_statistic": f3_statistic, "cache_interval": cache_interval,
                   "cache_depth": cache_depth}, f3_schedule is not None)
    skip = None
    if f3_schedule is not None:
        f3_schedule = as_schedule(f3_schedule)
        f3_schedule.num_skipped(f3_ratio)  # validates the ratio before the identity check's work
        settings = run_settings(s, len(sigmas) - 1, schedule_name)
        for message in f3_schedule.check(model.unet.temporal_units(), unet_identity(model.unet), settings):
            warnings.warn(message, stacklevel=3)
        skip = f3_schedule.skip_sets(f3_ratio, f3_statistic)
    if cache_depth is not None and cache_depth >= len(model.unet.output_blocks):
        raise ValueError(f"cache_depth must be below {len(model.unet.output_blocks)} (the UNet's output blocks), "
                         f"got {cache_depth}")
    return build_plan(sigmas, guidance=s.max_guidance_scale > 1, guidance_cut_step=guidance_cut_step,
                      skip_temporal=skip, cache_interval=cache_interval, cache_depth=cache_depth)


def run_settings(s: SamplingConfig, num_steps: int, schedule_name: str) -> dict:
    """The settings an F3 schedule records and is checked against."""
    keys = ("num_frames", "height", "width", "min_guidance_scale", "max_guidance_scale", "fps", "motion_bucket_id",
            "noise_aug_strength")
    return {k: getattr(s, k) for k in keys} | {"num_inference_steps": num_steps, "schedule": schedule_name}


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
             batch_size: int = 1) -> Video | list[Video]:
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
    Returns a `Video` (uint8 frames, fps, seed) whose `latents` are the final denoised latents (a list for a list).
    Settings, options, images and device are checked before the model is loaded; non-finite values stop the run.
    """
    f3_schedule = check_before_loading(  # settings, options and the F3 schedule's fit, before the model loads
        model, f3_schedule=f3_schedule, speed=speed, schedule=schedule, guidance_cut_step=guidance_cut_step,
        f3_ratio=f3_ratio, f3_statistic=f3_statistic, cache_interval=cache_interval, cache_depth=cache_depth,
        num_frames=num_frames, num_inference_steps=num_inference_steps, fps=fps, motion_bucket_id=motion_bucket_id,
        noise_aug_strength=noise_aug_strength, min_guidance_scale=min_guidance_scale,
        max_guidance_scale=max_guidance_scale, decode_chunk_size=decode_chunk_size, height=height, width=width)
    for seed_k in seed if isinstance(seed, (list, tuple)) else [seed]:  # one seed, or one per image
        checks.check_settings(seed=seed_k)
    o = speed_options(speed, dict(num_inference_steps=num_inference_steps, schedule=schedule,
                                  guidance_cut_step=guidance_cut_step, f3_ratio=f3_ratio, f3_statistic=f3_statistic,
                                  cache_interval=cache_interval, cache_depth=cache_depth))
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    batched = isinstance(image, (list, tuple))
    images = [open_image(im) if isinstance(im, (str, Path)) else im  # a bad file fails here, before loading
              for im in (image if batched else [image])]
    device, dtype = (None if device == "auto" else device), (None if dtype == "auto" else dtype)
    if not isinstance(model, SVDModel):
        model = load_model(model, device=device or "auto", dtype=dtype or "auto", token=token, progress=progress)
    dev, dtype = checks.model_device_dtype(model.unet, device, dtype)
    sigmas, schedule_name = noise_schedule(o.get("num_inference_steps"), o.get("schedule"), sigmas,
                                           model.sampling.num_inference_steps)
    s = resolve_settings(model, num_frames=num_frames, num_inference_steps=len(sigmas) - 1, fps=fps,
                         motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength,
                         min_guidance_scale=min_guidance_scale, max_guidance_scale=max_guidance_scale,
                         decode_chunk_size=decode_chunk_size, height=height, width=width)
    plan = make_plan(model, s, sigmas, schedule_name=schedule_name, f3_schedule=f3_schedule,
                     **{k: o[k] for k in ("guidance_cut_step", "f3_ratio", "f3_statistic", "cache_interval",
                                          "cache_depth") if k in o})
    seeds, generators = make_generators(len(images), seed, generator, batched)
    latents = _per_image(latents, len(images), batched, "latents")
    t, videos = s.num_frames, []
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        x = sample(model, images[part], s, plan, generator=generators[part], latents=latents[part], device=dev,
                   dtype=dtype, progress=progress)
        checks.check_finite(x, "the latents after sampling", f"the UNet ran in {dtype}: try float32 (CLI: --dtype "
                            "fp32) or bf16, and check the UNet weights for NaN/inf")
        decoded = decode(model, x, t, s.decode_chunk_size, progress)
        checks.check_finite(decoded, "the decoded frames", "the VAE decoder (float32) produced them from finite "
                            "latents: its weights hold NaN/inf (corrupt file?)")
        frames = to_uint8_frames(decoded)
        videos += [Video(frames[k * t:(k + 1) * t], float(s.fps), latents=x[k * t:(k + 1) * t].cpu(), seed=seed_k)
                   for k, seed_k in enumerate(seeds[part])]
    return videos if batched else videos[0]


def make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    return generator if generator is not None else torch.Generator().manual_seed(
        seed if seed is not None else random_seed())


def _per_image(value, count: int, batched: bool, name: str) -> list:
    """A per-image argument as a list of `count`: for a list of images a list (or None), else the one value."""
    if not batched:
        return [value]
    if value is None:
        return [None] * count
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ValueError(f"{name} for a list of {count} images must be a list of {count} (one per image) or None, "
                         f"got {type(value).__name__}" + (f" of {len(value)}" if isinstance(value, (list, tuple))
                                                          else ""))
    return list(value)


def make_generators(count: int, seed, generator, batched: bool) -> tuple[list, list[torch.Generator]]:
    """(seeds, generators), one per image: `seed` is an int (a list of images: image k gets seed + k), a list of
    ints, or None (a random seed); the seed is None where a generator was passed."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        return [None] * count, _per_image(generator, count, batched, "generator")
    if batched and isinstance(seed, (list, tuple)):
        seeds = _per_image(seed, count, batched, "seed")
    else:
        if seed is None:
            seed = random_seed()
        seeds = [seed + k for k in range(count)] if isinstance(seed, int) and not isinstance(seed, bool) else [seed]
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**64:
            raise ValueError(f"a seed must be an int in [0, 2**64), got {s!r}")
    return seeds, [torch.Generator().manual_seed(s) for s in seeds]


def sample(model: SVDModel, image, s: SamplingConfig, plan: Plan, *, generator: torch.Generator,
           latents: torch.Tensor | None = None, device="cpu", dtype: torch.dtype = torch.float32,
           progress: bool = False, record: dict | None = None) -> torch.Tensor:
    """Condition on the image(s) and run the plan's sampling loop: the final latents ((b t), 4, h/8, w/8), fp32.

    image: one image, or a list of b images (videos sampled together as `(b t)` rows); then `generator` and
        `latents` are lists of b too, one per video, each generator drawn in the one-video order (the condition
        image's noise augmentation, then the initial latents).
    record: a dict that receives {step: {unit: {"attention", "contribution"}}} (F3 calibration)."""
    dev = torch.device(device)
    batched = isinstance(image, (list, tuple))
    images = list(image) if batched else [image]
    generators = _per_image(generator, len(images), batched, "generator")
    noises = _per_image(latents, len(images), batched, "latents")
    pixels = torch.cat([load_image(im, s.height, s.width) for im in images]).to(dev)
    image_embeds = encode_image(model.image_encoder, pixels).float()  # preprocesses (224 resize, CLIP norm)
    cond_pixels = torch.cat([augment_condition_image(p[None], s.noise_aug_strength, g)
                             for p, g in zip(pixels, generators)])
    cond_latent = model.vae_encoder(cond_pixels).float()
    checks.check_finite(torch.cat([image_embeds.flatten(), cond_latent.flatten()]), "the CLIP embedding and VAE "
                        "latent of the image", "the image encoder or VAE encoder weights hold NaN/inf (corrupt file?)")
    latent_shape = (s.num_frames, cond_latent.shape[1], *cond_latent.shape[-2:])
    for k, (noise, g) in enumerate(zip(noises, generators)):
        noises[k] = (torch.randn(latent_shape, generator=g, device=g.device) if noise is None
                     else checks.check_latents(noise, latent_shape))
    latents = torch.cat([noise.to(dev, torch.float32) for noise in noises])  # ((b t), 4, h/8, w/8)
    vector = micro_conditioning(fps_id_from_fps(s.fps), s.motion_bucket_id, s.noise_aug_strength, len(images),
                                device=dev)
    batch = cfg_batch(image_embeds, cond_latent, vector, s.num_frames)
    sigmas = plan.sigmas_tensor(dev)
    x = sampling.initial_latents(latents, sigmas)
    denoise = make_denoiser(model, batch, s.num_frames, s.min_guidance_scale, s.max_guidance_scale, plan.cache_depth,
                            dtype, record)
    with tqdm(total=plan.num_steps, desc="denoising", disable=not progress) as bar:
        return sampling.sample_euler_edm(denoise, x, sigmas, steps=plan.steps, callback=lambda info: bar.update(1))


def make_denoiser(model: SVDModel, batch, num_frames: int, min_g: float, max_g: float, cache_depth: int | None,
                  dtype: torch.dtype, record: dict | None = None):
    """The planned denoiser `denoise(x, sigma, step, carry) -> (D, carry)` for `sampling.sample_euler_edm`.

    Every cross-attention vector is computed here, once per video. A guided step runs both halves [uncond; cond]
    and applies the per-frame guidance; otherwise only the conditional half runs. The step's skipped temporal
    units and cache mode go to the UNet as arguments; `carry` is the deep features of the last refreshing step
    (a guided step's features serve a later conditional-only step through their conditional half)."""
    unet = model.unet
    vectors_both = unet.context_vectors(batch.context.to(dtype), num_frames)
    half = batch.context.shape[0] // 2
    # the conditional half's vectors are the second half of every (per-frame, per-video) vector: [uncond; cond]
    vectors_cond = {name: [(s[s.shape[0] // 2:], t[t.shape[0] // 2:]) for s, t in per_depth]
                    for name, per_depth in vectors_both.items()}
    scales = sampling.frame_guidance_scales(num_frames, min_g, max_g)

    def denoise(x, sigma, step: Step, carry):
        vectors, y, concat = ((vectors_both, batch.vector, batch.concat) if step.guided else
                              (vectors_cond, batch.vector[half:], batch.concat[half:]))
        rows = concat.shape[0]
        cached = None
        if step.cache == "reuse":
            cached = carry if carry.shape[0] == rows else carry[carry.shape[0] - rows:]  # the conditional half
        kept = {}

        def network(net_in, c_noise):
            options = {} if step.cache is None else {"cache_depth": cache_depth, "cached": cached}
            out = unet(net_in.to(dtype), c_noise, None, y.to(dtype), num_frames, context_vectors=vectors,
                       skip_temporal=step.skip_temporal,
                       record=None if record is None else record.setdefault(step.index, {}), **options)
            if step.cache is not None:
                out, kept["features"] = out
            return out.float()

        if step.guided:
            return sampling.make_cfg_denoiser(network, concat, scales)(x, sigma), kept.get("features")
        return sampling.edm_denoise(network, x, sigma, concat), kept.get("features")

    return denoise


def decode(model: SVDModel, latents: torch.Tensor, num_frames: int, chunk_size: int, progress: bool = False):
    """Final latents -> frames in [-1, 1] (float32 VAE, chunks of `chunk_size` frames), with a progress bar."""
    chunks = math.ceil(num_frames / chunk_size) * (latents.shape[0] // num_frames)
    with tqdm(total=chunks, desc="decoding", disable=not progress) as bar:
        def decoder(z, n):
            out = model.vae_decoder(z, n)
            bar.update(1)
            return out
        return decode_latents(decoder, latents.float(), num_frames, chunk_size, model.vae_config.scale_factor)
