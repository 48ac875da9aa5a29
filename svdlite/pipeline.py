"""Image to video: `generate(image, model=..., ...)`, the whole of SVD_SPEC.md section 11.

Argument names follow diffusers' `StableVideoDiffusionPipeline`; defaults come from the model's preset. With the
same weights, image, `latents` (or seed) and settings, the frames equal diffusers' (tests/test_pipeline_diffusers.py).
Randomness comes only from one CPU `torch.Generator`, drawn in diffusers' order: the condition image's noise
augmentation, then the initial latents.
"""
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import sampling
from .clip import encode_image
from .components import SVDModel, load_model
from .conditioning import augment_condition_image, cfg_batch, fps_id_from_fps, micro_conditioning
from .vae import decode_latents
from .video import Video, to_uint8_frames


def load_image(image, height: int, width: int) -> torch.Tensor:
    """A path, PIL image or tensor -> (1, 3, height, width) float32 in [-1, 1].

    Tensors are (3, H, W) or (1, 3, H, W) in [0, 1] (diffusers' convention). An image of another size is scaled
    to cover height x width (Lanczos, aspect kept) and centre-cropped, as sgm's gradio demo does."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as img:
            image = img.convert("RGB")
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (width, height):
            scale = max(width / image.width, height / image.height)
            size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
            image = image.resize(size, Image.LANCZOS)
            left, top = (size[0] - width) // 2, (size[1] - height) // 2
            image = image.crop((left, top, left + width, top + height))
        image = torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a path, a PIL image or a tensor, got {type(image).__name__}")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"image tensor must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
    if image.shape[-2:] != (height, width):
        raise ValueError(f"image tensor is {tuple(image.shape[-2:])}, expected (height, width) = ({height}, {width}); "
                         "pass a PIL image or a path to have it resized")
    if image.min() < 0 or image.max() > 1:
        raise ValueError(f"image tensor values must lie in [0, 1], got [{image.min():.3g}, {image.max():.3g}]")
    return image.float() * 2.0 - 1.0


def _check_size(model: SVDModel, height: int, width: int) -> None:
    multiple = model.vae_config.downscale * model.unet.config.latent_downscale
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")


@torch.no_grad()
def generate(image, *, model="svd-xt", num_frames: int | None = None, num_inference_steps: int | None = None,
             fps: int | None = None, motion_bucket_id: int | None = None, noise_aug_strength: float | None = None,
             min_guidance_scale: float | None = None, max_guidance_scale: float | None = None,
             decode_chunk_size: int | None = None, height: int | None = None, width: int | None = None,
             seed: int | None = None, generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
             guidance_cut_step: int | None = None, device="cpu", dtype: torch.dtype = torch.float32,
             progress: bool = True, token: str | None = None) -> Video:
    """Generate a video from one image. Unset arguments take the preset's defaults (`model.sampling`).

    model: an `SVDModel` from `load_model`, or anything `load_model` takes (preset name, file, folder).
    fps: the frame rate; the model is conditioned on fps - 1 (fps=7 reproduces sgm's official script).
    latents: the initial noise at unit variance, (num_frames, 4, height/8, width/8), as diffusers takes it.
    guidance_cut_step: from this step on only the conditional branch runs (approximate; None = exact).
    Returns a `Video` (uint8 frames, fps) whose `latents` are the final denoised latents.
    """
    if not isinstance(model, SVDModel):
        model = load_model(model, device=device, dtype=dtype, token=token)
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
    for name, value in (("num_frames", num_frames), ("num_inference_steps", steps), ("decode_chunk_size", chunk)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    _check_size(model, height, width)
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is None:
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    if guidance_cut_step is not None and not 0 <= guidance_cut_step <= steps:
        raise ValueError(f"guidance_cut_step must be in [0, {steps}], got {guidance_cut_step}")
    dev = torch.device(device)

    pixels = load_image(image, height, width).to(dev)
    image_embeds = encode_image(model.image_encoder, pixels).float()  # preprocesses (224 resize, CLIP norm)
    cond_pixels = augment_condition_image(pixels, aug, generator)
    cond_latent = model.vae_encoder(cond_pixels).float()
    latent_shape = (num_frames, cond_latent.shape[1], *cond_latent.shape[-2:])
    if latents is None:
        latents = torch.randn(latent_shape, generator=generator, device=generator.device)
    elif tuple(latents.shape) != latent_shape:
        raise ValueError(f"latents must have shape {latent_shape}, got {tuple(latents.shape)}")
    vector = micro_conditioning(fps_id_from_fps(fps), motion_bucket_id, aug, 1, device=dev)
    batch = cfg_batch(image_embeds, cond_latent, vector, num_frames)
    sigmas = sampling.edm_sigmas(steps, device=dev)
    x = sampling.initial_latents(latents.to(dev, torch.float32), sigmas)
    denoise = make_denoiser(model, batch, num_frames, min_g, max_g, sigmas, guidance_cut_step, dtype)
    with tqdm(total=steps, desc="denoising", disable=not progress) as bar:
        x = sampling.sample_euler_edm(denoise, x, sigmas, callback=lambda info: bar.update(1))
    frames = decode(model, x, num_frames, chunk, progress)
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
