"""Which kernel or slicing a call takes, by device and size: the one place these choices are made and switched.

Two kinds of choice, each a small function the layers ask:

CPU speed (the device type is "cpu"):
  `conv_linear`  float32 `layers.linear` with >= CONV_LINEAR_MIN_ROWS rows runs as a oneDNN 1x1 convolution
                 (docs/SPEED.md).
  `ff_rows`      the GEGLU feed-forward runs in row chunks whose projection is FF_CHUNK_BYTES (cache-sized).

Memory (any device; decided from the bytes the unsliced call would hold at once, docs/memory.md):
  `ff_rows`      off the CPU, the feed-forward runs in row chunks once its (rows, 2 inner) projection exceeds
                 FF_MEMORY_BYTES; rows are independent, so each output row is the same product.
  `norm_rows`    GroupNorm32 on half-precision input normalises its float32 copy in sample chunks once that copy
                 exceeds NORM_MEMORY_BYTES (every sample has its own statistics).
  `decode_frames` off the CPU, the VAE decoder's per-frame work (spatial ResnetBlocks, attention, upsampling, the
                 output conv) runs in frame sub-batches once a chunk's widest full-resolution tensor exceeds
                 DECODE_MEMORY_BYTES (exact to float32 rounding: convolution kernels are chosen per batch size).

`FORCE_DEVICE` (or the `as_device` context manager) makes every choice as on that device type: the tests run the
GPU's choices on CPU tensors. Meta tensors (tools/count_memory.py's `cuda` target) take the non-CPU choices.
"""
import contextlib

import torch

MIB = 2**20

# fewest rows for which `linear` runs as a 1x1 convolution: below, oneDNN's per-call weight reorder costs more than
# its faster kernel saves (28 rows: 1.9-2.1x F.linear's time; 112: 1.15x; 256-28672: 0.73-0.92x; docs/SPEED.md)
CONV_LINEAR_MIN_ROWS = 256

# bytes of one chunk of GEGLU's projection (rows x 2 inner) on the CPU: below glibc's largest mmap threshold
# (32 MiB), so chunk buffers come from the heap again instead of fresh zeroed pages at every call
FF_CHUNK_BYTES = 16 * MIB

# off the CPU: the largest GEGLU projection made at once. SVD-XT's level-0 temporal feed-forward at 1024x576 x 25
# frames (guided: 460,800 rows x 2,560, fp16) is 2,250 MiB: 9 chunks of <= 256 MiB, each still a GEMM of ~50k rows
FF_MEMORY_BYTES = 256 * MIB

# the largest float32 copy GroupNorm32 makes of half-precision input at once (the UNet's level-0 concatenations:
# 1,688 MiB at 1024x576 x 25 frames, guided)
NORM_MEMORY_BYTES = 256 * MIB

# the VAE decoder's per-frame work runs on at most this many bytes of its widest full-resolution tensor at once:
# one frame at a time from 512x256 up (a 256-channel float32 frame of 512x320 is 160 MiB, of 1024x576 576 MiB); a
# frame's convolutions are still large GEMM-like products there. At 1 GiB, 768x448 ran 3 frames at once and its
# decode at chunk 4 counted 2.82 GiB, above diffusers' float16 decoder (2.64)
DECODE_MEMORY_BYTES = 128 * MIB

FORCE_DEVICE: str | None = None


@contextlib.contextmanager
def as_device(device_type: str | None):
    """Within the block every choice is made as on `device_type` ("cpu", "cuda"; None: the tensors' own)."""
    global FORCE_DEVICE
    previous, FORCE_DEVICE = FORCE_DEVICE, device_type
    try:
        yield
    finally:
        FORCE_DEVICE = previous


def device_type(x: torch.Tensor) -> str:
    return FORCE_DEVICE or x.device.type


def conv_linear(x: torch.Tensor, rows: int) -> bool:
    """Whether `layers.linear` runs x (rows of it) as a oneDNN 1x1 convolution: float32 on the CPU, enough rows,
    not under torch.compile (the compiler chooses its own kernels and cannot trace the oneDNN availability query)."""
    return (device_type(x) == "cpu" and x.dtype == torch.float32 and rows >= CONV_LINEAR_MIN_ROWS
            and not torch.compiler.is_compiling()
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def ff_rows(x: torch.Tensor, projection_features: int) -> int | None:
    """Rows per chunk of the feed-forward on x (..., dim) whose GEGLU projection has `projection_features` outputs,
    or None for one pass: on the CPU chunks of FF_CHUNK_BYTES (speed), elsewhere chunks of FF_MEMORY_BYTES once
    the whole projection is larger (memory)."""
    rows = x[..., 0].numel() if x.ndim >= 2 else 0
    row_bytes = projection_features * x.element_size()
    budget = FF_CHUNK_BYTES if device_type(x) == "cpu" else FF_MEMORY_BYTES
    chunk = max(1, budget // row_bytes)
    return chunk if rows > chunk else None


def norm_rows(x: torch.Tensor) -> int | None:
    """Samples per chunk for GroupNorm32 on x (n, c, ...), or None for one pass: chunks only for half-precision
    input whose float32 copy exceeds NORM_MEMORY_BYTES (float32 input is normalised with no copy)."""
    if x.dtype == torch.float32 or x.ndim < 2 or x.shape[0] < 2:
        return None
    sample_bytes = x[0].numel() * 4
    chunk = max(1, NORM_MEMORY_BYTES // sample_bytes)
    return chunk if x.shape[0] > chunk else None


def decode_frames(z: torch.Tensor, frame_bytes: int) -> int:
    """Frames per sub-batch of the decoder's per-frame work on latents z ((b t), c, h, w), `frame_bytes` being one
    frame of its widest full-resolution tensor: on the CPU always all frames (oneDNN picks its convolution kernel
    by batch size, and a 1-frame batch can sum in another order, so sub-batches agree with the whole batch only to
    float32 rounding: CPU outputs stay bit for bit those of one batch); elsewhere `frames_per_batch`."""
    return z.shape[0] if device_type(z) == "cpu" else frames_per_batch(z.shape[0], frame_bytes)


def frames_per_batch(frames: int, frame_bytes: int) -> int:
    """All `frames` while they fit in DECODE_MEMORY_BYTES, else as many as fit (at least 1)."""
    if frames * frame_bytes <= DECODE_MEMORY_BYTES:
        return frames
    return max(1, DECODE_MEMORY_BYTES // frame_bytes)
