"""Image to video: `generate(image, model=..., ...)`, the whole of SVD_SPEC.md section 11.

Argument names follow diffusers' `StableVideoDiffusionPipeline`; defaults come from the model's preset. With the
same weights, image, `latents` (or seed) and settings, the frames equal diffusers' (tests/test_pipeline_diffusers.py).
Randomness comes only from one CPU `torch.Generator`, drawn in diffusers' order: the condition image's noise
augmentation, then the initial latents.
"""
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checks, sampling
from .clip import encode_image
from .components import SVDModel, load_model
from .conditioning import augment_condition_image, cfg_batch, fps_id_from_fps, micro_conditioning
from .image import load_image, open_image
from .vae import decode_latents
from .video import Video, to_uint8_frames


@torch.no_grad()
def generate(image, *, model="svd-xt", num_frames: int | None = None, num_inference_steps: int | None = None,
             fps: int | None = None, motion_bucket_id: int | None = None, noise_aug_strength: float | None = None,
             min_guidance_scale: float | None = None, max_guidance_scale: float | None = None,
             decode_chunk_size: int | None = None, height: int | None = None, width: int | None = None,
             seed: int | None = None, generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
             guidance_cut_step: int | None = None, device=None, dtype: torch.dtype | None = None,
             progress: bool = True, token: str | None = None) -> Video:
    """Generate a video from one image. Unset arguments take the preset's defaults (`model.sampling`).

    model: an `SVDModel` from `load_model`, or anything `load_model` takes (preset name, file, folder).
    device, dtype: where and in which precision the UNet and CLIP run; by default a loaded model's own, else
        cpu and float32. A loaded model is never moved or cast: asking for another device or dtype is an error.
    fps: the frame rate; the model is conditioned on fps - 1 (fps=7 reproduces sgm's official script).
    latents: the initial noise at unit variance, (num_frames, 4, height/8, width/8), or (1, num_frames, ...) as
        diffusers takes it.
    guidance_cut_step: from this step on only the conditional branch runs (approximate; None = exact).
    Returns a `Video` (uint8 frames, fps) whose `latents` are the final denoised latents.
    Settings, image and device are checked before the model is loaded; non-finite values stop the run.
    """
    settings = dict(num_frames=num_frames, num_inference_steps=num_inference_steps, fps=fps,
                    motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength,
                    min_guidance_scale=min_guidance_scale, max_guidance_scale=max_guidance_scale,
                    decode_chunk_size=decode_chunk_size, height=height, width=width, seed=seed,
                    guidance_cut_step=guidance_cut_step)
    checks.check_settings(**settings)
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if isinstance(image, (str, Path)):
        image = open_image(image)  # a bad file fails here, before the model loads
    if not isinstance(model, SVDModel):
        model = load_model(model, device=checks.resolve_device(device or "cpu"),
                           dtype=checks.check_dtype(dtype or torch.float32), token=token)
    dev, dtype = checks.model_device_dtype(model.unet, device, dtype)
    d = model.sampling
    num_frames = d.num_frames if num_frames is None else num_frames
    steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
    fps = d.fps if fps is None else fps
    motion_bucket_id = d.motion_bucket_id if motion_bucket_id is None else motion_bucket_id
    aug = d.noise_aug_strength if noise_aug_strength is None else noise_aug_strength
    min_g = d.min_guidance_scale if min_guidance_scale is None else min_guidance_scale
    max_g = d.max_guidance_scale if max_guidance_scale is None else max_guidance_scale
    chunk = d.decode_chunk_size if decode_chunk_size is None else decode_chunk_size
    height, width = d.height if height is None else height, d.width if width is None else width
    checks.check_settings(num_frames=num_frames, num_inference_steps=steps, fps=fps, motion_bucket_id=motion_bucket_id,
                          noise_aug_strength=aug, min_guidance_scale=min_g, max_guidance_scale=max_g,
                          decode_chunk_size=chunk, height=height, width=width, guidance_cut_step=guidance_cut_step,
                          size_multiple=model.vae_config.downscale * model.unet.config.latent_downscale)
    if generator is None:
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())

    pixels = load_image(image, height, width).to(dev)
    image_embeds = encode_image(model.image_encoder, pixels).float()  # preprocesses (224 resize, CLIP norm)
    cond_pixels = augment_condition_image(pixels, aug, generator)
    cond_latent = model.vae_encoder(cond_pixels).float()
    checks.check_finite(torch.cat([image_embeds.flatten(), cond_latent.flatten()]), "the CLIP embedding and VAE "
                        "latent of the image", "the image encoder or VAE encoder weights hold NaN/inf (corrupt file?)")
    latent_shape = (num_frames, cond_latent.shape[1], *cond_latent.shape[-2:])
    if latents is None:
        latents = torch.randn(latent_shape, generator=generator, device=generator.device)
    else:
        latents = checks.check_latents(latents, latent_shape)
    vector = micro_conditioning(fps_id_from_fps(fps), motion_bucket_id, aug, 1, device=dev)
    batch = cfg_batch(image_embeds, cond_latent, vector, num_frames)
    sigmas = sampling.edm_sigmas(steps, device=dev)
    x = sampling.initial_latents(latents.to(dev, torch.float32), sigmas)
    denoise = make_denoiser(model, batch, num_frames, min_g, max_g, sigmas, guidance_cut_step, dtype)
    with tqdm(total=steps, desc="denoising", disable=not progress) as bar:
        x = sampling.sample_euler_edm(denoise, x, sigmas, callback=lambda info: bar.update(1))
    checks.check_finite(x, "the latents after sampling", f"the UNet ran in {dtype}: try float32 (CLI: --dtype fp32) "
                        "or bf16, and check the UNet weights for NaN/inf")
    frames = decode(model, x, num_frames, chunk, progress)
    checks.check_finite(frames, "the decoded frames", "the VAE decoder (float32) produced them from finite latents: "
                        "its weights hold NaN/inf (corrupt file?)")
    return Video(to_uint8_frames(frames), float(fps), latents=x.cpu())


def make_denoiser(model: SVDModel, batch, num_frames: int, min_g: float, max_g: float, sigmas: torch.Tensor,
                  guidance_cut_step: int | None, dtype: torch.dtype):
    """The guided denoiser D(x, sigma), with every cross-attention vector computed here, once per video.

    Guidance runs both halves [uncond; cond] (skipped, as in diffusers, when max_guidance_scale <= 1); from
    `guidance_cut_step` on (sigma <= sigmas[K]) only the conditional half runs."""
    unet = model.unet
    vectors_both = unet.context_vectors(batch.context.to(dtype), num_frames)
    half = batch.context.shape[0] // 2
    # the conditional half's vectors are the second half of every (per-frame, per-video) vector: [uncond; cond]
    vectors_cond = {name: [(s[s.shape[0] // 2:], t[t.shape[0] // 2:]) for s, t in per_depth]
                    for name, per_depth in vectors_both.items()}

    def network(vectors, y):
        def run(net_in, c_noise):
            return unet(net_in.to(dtype), c_noise, None, y.to(dtype), num_frames, context_vectors=vectors).float()
        return run

    conditional = network(vectors_cond, batch.vector[half:])
    if max_g <= 1:
        return lambda x, sigma: sampling.edm_denoise(conditional, x, sigma, batch.concat[half:])
    guided = sampling.make_cfg_denoiser(network(vectors_both, batch.vector), batch.concat,
                                        sampling.frame_guidance_scales(num_frames, min_g, max_g))
    if guidance_cut_step is None or guidance_cut_step >= len(sigmas) - 1:
        return guided
    cut_sigma = sigmas[guidance_cut_step]

    def denoise(x, sigma):
        if sigma <= cut_sigma:
            return sampling.edm_denoise(conditional, x, sigma, batch.concat[half:])
        return guided(x, sigma)

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
