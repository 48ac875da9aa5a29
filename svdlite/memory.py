"""How many frames the VAE decoder can take at once on a GPU, from svdlite's memory accounting (docs/memory.md,
`tools/count_memory.py`): at its peak the float32 temporal decoder holds about 3,060 bytes per output pixel for
every frame of a chunk (1.68 GiB per frame at 1024x576, 0.47 GiB at 512x320; the UNet step's activations are gone
by then). When the user gives no `decode_chunk_size`, a GPU with less free memory than the preset's chunk needs
decodes fewer frames at a time, and says so: the chunking changes the frames slightly (the temporal layers see the
frames of one chunk), so a run that must be reproduced on another GPU passes the chunk size explicitly.
"""
import torch

DECODE_BYTES_PER_PIXEL_FRAME = 3060
HEADROOM = 0.9  # of the free memory: allocator rounding and fragmentation (docs/memory.md "allowance")


def gpu_free_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation can take on a CUDA device (the driver's free memory plus torch's cached, unused
    blocks); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def decode_chunk_for(free_bytes: int | None, height: int, width: int, default: int) -> int:
    """The largest chunk up to `default` whose decoding fits in `free_bytes` (at least 1); `default` when the free
    memory is unknown (the CPU)."""
    if free_bytes is None:
        return default
    per_frame = DECODE_BYTES_PER_PIXEL_FRAME * height * width
    return max(1, min(default, int(free_bytes * HEADROOM // per_frame)))
