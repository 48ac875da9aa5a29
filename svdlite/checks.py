"""Checks of `generate`'s settings, device, dtype, seed and latents: a clear error before any heavy work starts.

Each error names the setting, the value given and what is expected. `check_settings` takes the values the caller
set (None = not set, checked later as the preset's default) so it can run before the model is even loaded.
"""
import math

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 <= seed < 2**64


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value, *, hint: str = "") -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}{hint}")


def finite_number(name: str, value, *, minimum: float | None = None, hint: str = "") -> None:
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}{hint}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}{hint}")


def check_settings(*, num_frames=None, num_inference_steps=None, fps=None, motion_bucket_id=None,
                   noise_aug_strength=None, min_guidance_scale=None, max_guidance_scale=None, decode_chunk_size=None,
                   height=None, width=None, size_multiple: int | None = None, seed=None,
                   guidance_cut_step=None) -> None:
    """Raise ValueError for the first setting that is out of range or inconsistent; None means "not set".

    size_multiple: what height and width must be multiples of (the model's, 64 for SVD); None checks only that
    they are positive ints (before the model is known)."""
    for name, value in (("num_frames", num_frames), ("num_inference_steps", num_inference_steps),
                        ("decode_chunk_size", decode_chunk_size)):
        if value is not None:
            positive_int(name, value)
    if fps is not None:
        positive_int("fps", fps, hint=" (frames per second; the model is conditioned on fps - 1)")
    if motion_bucket_id is not None:
        finite_number("motion_bucket_id", motion_bucket_id, minimum=0,
                      hint=" (more motion when higher; SVD was trained on 0..255, 127 by default)")
    if noise_aug_strength is not None:
        finite_number("noise_aug_strength", noise_aug_strength, minimum=0,
                      hint=" (the std of the noise added to the condition image, 0.02 by default)")
    for name, value in (("min_guidance_scale", min_guidance_scale), ("max_guidance_scale", max_guidance_scale)):
        if value is not None:
            finite_number(name, value)
    if min_guidance_scale is not None and max_guidance_scale is not None and min_guidance_scale > max_guidance_scale:
        raise ValueError(f"min_guidance_scale={min_guidance_scale} is above max_guidance_scale={max_guidance_scale}; "
                         "guidance rises linearly from min (first frame) to max (last frame)")
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        multiple = size_multiple or 1
        if not _is_int(value) or value < multiple or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}" if size_multiple
                             else f"{name} must be a positive int, got {value!r}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < SEED_LIMIT):
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if guidance_cut_step is not None:
        if not _is_int(guidance_cut_step) or guidance_cut_step < 0:
            raise ValueError(f"guidance_cut_step must be an int >= 0, got {guidance_cut_step!r}")
        if num_inference_steps is not None and guidance_cut_step > num_inference_steps:
            raise ValueError(f"guidance_cut_step must be in [0, {num_inference_steps}] (the number of steps), "
                             f"got {guidance_cut_step}")


def resolve_device(device) -> torch.device:
    """A device name or torch.device -> torch.device, refused if unknown or absent on this machine.

    "auto" is the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; expected cpu, cuda, cuda:N, mps or auto") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked, but torch sees no CUDA GPU (torch {torch.__version__}, "
                             f"built for CUDA {torch.version.cuda}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked, but there are {torch.cuda.device_count()} CUDA GPUs "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r} asked, but MPS (Apple GPU) is not available here; use cpu")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; expected cpu, cuda, cuda:N, mps or auto")
    return dev


def check_dtype(dtype) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(str(d) for d in DTYPES)}, got {dtype!r}")
    return dtype


def model_device_dtype(module: torch.nn.Module, device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype a loaded network runs on; asking for others is an error (it is never moved or cast)."""
    weight = next(module.parameters())
    if device is not None:
        dev = resolve_device(device)
        if dev.type != weight.device.type or dev.index not in (None, weight.device.index):
            raise ValueError(f"the model is on {weight.device}, not on device={str(device)!r}; leave device unset "
                             "or load the model there (load_model(..., device=...))")
    if dtype is not None and check_dtype(dtype) != weight.dtype:
        raise ValueError(f"the model's UNet is {weight.dtype}, not dtype={dtype}; leave dtype unset or load the model "
                         "in that dtype (load_model(..., dtype=...))")
    return weight.device, weight.dtype


def check_latents(latents: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise as (frames, c, h, w) or diffusers' (1, frames, c, h, w) -> (frames, c, h, w)."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a tensor, got {type(latents).__name__}")
    if latents.ndim == 5 and latents.shape[0] == 1:
        latents = latents[0]
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents must have shape {tuple(shape)} or (1, {', '.join(map(str, shape))}) as diffusers "
                         f"takes them, got {tuple(latents.shape)}")
    if not latents.is_floating_point() or not torch.isfinite(latents).all():
        raise ValueError(f"latents must be finite floating-point values, got {latents.dtype}"
                         + ("" if not latents.is_floating_point() else " holding NaN or inf"))
    return latents


def check_finite(tensor: torch.Tensor, where: str, fix: str) -> None:
    """Stop with a message saying where values stopped being finite and what to try, rather than write a
    black or garbage video."""
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise FloatingPointError(f"{where} hold {bad} NaN or infinite values of {tensor.numel()}; {fix}")


def resolve_dtype(dtype, device) -> torch.dtype:
    """The UNet's and CLIP's dtype: a torch dtype as given, or "auto": float16 on a CUDA or MPS GPU (what SVD runs
    in there), float32 on the CPU (where half precision is slower and less exact)."""
    if dtype == "auto":
        return torch.float16 if torch.device(device).type in ("cuda", "mps") else torch.float32
    return check_dtype(dtype)
