"""How many frames the VAE decoder can take at once on a GPU, from svdlite's memory accounting (docs/memory.md,
`tools/count_memory.py`). At its peak the float32 temporal decoder holds, per output pixel, about 1,540 bytes for
every frame of a chunk (its (3,1,1) ResBlocks at full resolution: three 128-channel float32 tensors of the whole
chunk) and about 1,330 bytes for every frame of one sub-batch of its per-frame work (`kernels.decode_frames`: one
frame at a time from 512x256 up); counted: 11.8 GiB for 14 frames at 1024x576, 1.6 GiB for one (the UNet step's
activations are gone by then). When the user gives no `decode_chunk_size`, a GPU with less free memory than the
preset's chunk needs decodes fewer frames at a time, and says so: the chunking changes the frames slightly (the
temporal layers see the frames of one chunk), so a run that must be reproduced on another GPU passes the chunk size
explicitly.
"""
import torch

from . import kernels

DECODE_BYTES_PER_PIXEL_FRAME = 1540
SUB_BATCH_BYTES_PER_PIXEL_FRAME = 1330
WIDEST_FRAME_BYTES_PER_PIXEL = 256 * 4  # one frame of the decoder's widest full-resolution tensor (256 ch, float32)
HEADROOM = 0.9  # of the free memory: allocator rounding and fragmentation (docs/memory.md "allowance")


def gpu_free_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation can take on a CUDA device (the driver's free memory plus torch's cached, unused
    blocks); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def decode_bytes(chunk: int, height: int, width: int) -> int:
    """The decoder's peak for `chunk` frames of height x width on a GPU, by the accounting (an upper bound within
    20% of the count, 1-6% at chunks 1 and 14: tests/test_memory.py)."""
    pixels = height * width
    sub_batch = kernels.frames_per_batch(chunk, WIDEST_FRAME_BYTES_PER_PIXEL * pixels)
    return pixels * (DECODE_BYTES_PER_PIXEL_FRAME * chunk + SUB_BATCH_BYTES_PER_PIXEL_FRAME * sub_batch)


def decode_chunk_for(free_bytes: int | None, height: int, width: int, default: int) -> int:
    """The largest chunk up to `default` whose decoding fits in `free_bytes` (at least 1); `default` when the free
    memory is unknown (the CPU)."""
    if free_bytes is None:
        return default
    budget = free_bytes * HEADROOM
    return next((c for c in range(default, 0, -1) if decode_bytes(c, height, width) <= budget), 1)
