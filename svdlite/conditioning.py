"""Image to condition: the CLIP embedding and VAE latent of the images, the micro-conditioning vector, the
noise-augmented condition image, the frame repeat, the CFG batch, and the initial noise (`condition`).

Reproduces what sgm's conditioner (`sgm/modules/encoders/modules.py`: `ConcatTimestepEmbedderND` for fps_id,
motion_bucket_id and cond_aug) and `scripts/sampling/simple_video_sample.py` (`get_batch`,
`force_uc_zero_embeddings`) feed the denoiser (docs/model.md "Conditioning"). The networks themselves (CLIP, VAE
encoder) live elsewhere: this module runs them on the images and arranges their outputs.
"""
from typing import NamedTuple

import torch
from einops import repeat

from . import checks
from .clip import encode_image
from .image import load_image
from .layers import timestep_embedding

MICRO_COND_DIM = 256  # per scalar; three scalars give the UNet's 768-d `y` (adm_in_channels)


def fps_id_from_fps(fps: int) -> int:
    """The fps id SVD is conditioned on: fps - 1 (the diffusers convention, `fps=7` -> id 6).

    The model was trained on "fps - 1". Front-ends disagree (docs/model.md): sgm `simple_video_sample.py` and
    the gradio demo pass `fps_id=6` directly (already subtracted, the video written at 7 fps); diffusers takes
    `fps=7` and subtracts 1, giving the same id 6; the sgm streamlit demo and ComfyUI pass fps 6 -> id 5. To
    reproduce the official script use fps=7 here (or pass fps_id=6 straight to `micro_conditioning`).
    """
    return fps - 1


def micro_conditioning(fps_id: float, motion_bucket_id: float, cond_aug: float, num_rows: int,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """The UNet's vector input y: (num_rows, 768) float32, the same row repeated.

    Each row is cat(emb(fps_id), emb(motion_bucket_id), emb(cond_aug)) with emb = `timestep_embedding(., 256)`
    (cos first), the order of sgm's conditioner embedders 1, 2, 4. Equal to diffusers' `added_time_ids`
    [fps - 1, motion_bucket_id, noise_aug_strength] through `Timesteps(256, True, 0)`. The values are rounded
    to float32 first, as sgm does. The same vector serves the conditional and unconditional branches.
    """
    values = torch.tensor([fps_id, motion_bucket_id, cond_aug], dtype=torch.float32, device=device)
    row = timestep_embedding(values, MICRO_COND_DIM).reshape(-1)  # (3 * 256,) in embedder order
    return repeat(row, "d -> n d", n=num_rows)


def augment_condition_image(image: torch.Tensor, noise_aug_strength: float,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise-augment the condition image in pixel space: image + strength * N(0, I) (sgm `cond_frames`).

    The noise is drawn with `generator` on the generator's device (so a CPU generator gives the same noise
    whatever the image's device, like diffusers' `randn_tensor`), then moved to the image's device.

    Args:
        image: (b, 3, H, W) in [-1, 1].
        noise_aug_strength: the std, the same value as the micro-conditioning cond_aug (0.02 by default).
        generator: the RNG; None uses the global one.
    """
    noise_device = generator.device if generator is not None else image.device
    noise = torch.randn(image.shape, generator=generator, device=noise_device, dtype=image.dtype)
    return image + noise_aug_strength * noise.to(image.device)


def repeat_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Repeat a per-video tensor for every frame: (b, ...) -> ((b t), ...), frames of one video contiguous."""
    return repeat(x, "b ... -> (b t) ...", t=num_frames)


class CFGBatch(NamedTuple):
    """Conditioning rows for one CFG-doubled UNet call, [uncond videos; cond videos], each ((2 b t), ...)."""
    context: torch.Tensor  # ((2 b t), 1, 1024) CLIP image token; zeros in the unconditional half
    concat: torch.Tensor  # ((2 b t), 4, h, w) condition latent (unscaled VAE mode); zeros in the unconditional half
    vector: torch.Tensor  # ((2 b t), 768) micro-conditioning; identical in both halves


def cfg_batch(image_embeds: torch.Tensor, cond_latent: torch.Tensor, vector: torch.Tensor,
              num_frames: int) -> CFGBatch:
    """Build the [uncond; cond] conditioning exactly like sgm's SVD sampling (docs/model.md "Conditioning").

    The unconditional branch zeroes the CLIP token and the concat latent (`force_uc_zero_embeddings =
    [cond_frames, cond_frames_without_noise]`) and keeps the vector; every per-video input is repeated per frame;
    `LinearPredictionGuider.prepare_inputs` then stacks `cat((uc, c))`, unconditional first.

    Args:
        image_embeds: (b, 1, 1024) CLIP image embedding of the clean image.
        cond_latent: (b, 4, h, w) VAE-encoded noise-augmented image (mode, no 0.18215 scaling).
        vector: (b, 768) micro-conditioning (`micro_conditioning(..., num_rows=b)`).
        num_frames: t.
    """
    b = image_embeds.shape[0]
    if cond_latent.shape[0] != b or vector.shape[0] != b:
        raise ValueError(f"batch sizes differ: image_embeds {b}, cond_latent {cond_latent.shape[0]}, "
                         f"vector {vector.shape[0]}")
    context = repeat_frames(image_embeds, num_frames)
    concat = repeat_frames(cond_latent, num_frames)
    vector = repeat_frames(vector, num_frames)
    return CFGBatch(context=torch.cat([torch.zeros_like(context), context]),
                    concat=torch.cat([torch.zeros_like(concat), concat]),
                    vector=torch.cat([vector, vector]))


def condition(model, images: list, s, generators: list, noises: list, device: torch.device
              ) -> tuple[CFGBatch, torch.Tensor]:
    """(the [uncond; cond] conditioning of b videos, their initial noise ((b t), 4, h/8, w/8) float32).

    Each video's generator is drawn in the one-video order of diffusers and sgm: the condition image's noise
    augmentation, then the initial latents (unless `noises` gives them). `s` is the run's `SamplingConfig`."""
    pixels = torch.cat([load_image(im, s.height, s.width) for im in images]).to(device)
    image_embeds = encode_image(model.image_encoder, pixels).float()  # preprocesses (224 resize, CLIP norm)
    cond_pixels = torch.cat([augment_condition_image(p[None], s.noise_aug_strength, g)
                             for p, g in zip(pixels, generators)])
    cond_latent = model.vae_encoder(cond_pixels).float()
    checks.check_finite(torch.cat([image_embeds.flatten(), cond_latent.flatten()]), "the CLIP embedding and VAE "
                        "latent of the image", "the image encoder or VAE encoder weights hold NaN/inf (corrupt file?)")
    latent_shape = (s.num_frames, cond_latent.shape[1], *cond_latent.shape[-2:])
    noises = [torch.randn(latent_shape, generator=g, device=g.device) if noise is None
              else checks.check_latents(noise, latent_shape) for noise, g in zip(noises, generators)]
    latents = torch.cat([noise.to(device, torch.float32) for noise in noises])  # ((b t), 4, h/8, w/8)
    vector = micro_conditioning(fps_id_from_fps(s.fps), s.motion_bucket_id, s.noise_aug_strength, len(images),
                                device=device)
    return cfg_batch(image_embeds, cond_latent, vector, s.num_frames), latents
