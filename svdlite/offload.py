"""Model offload: each network on the GPU only while it works (CLIP and the VAE encoder before sampling, the UNet
during it, the decoder after), the others in CPU memory, so that the largest of them sets the GPU's weight memory
instead of all four together. Asked for explicitly (`generate(..., offload="model")`, CLI `--offload model`); the
moves are the only difference from a plain run, which gives the same numbers.
"""
import contextlib

import torch
from torch import nn

OFFLOAD_MODES = (None, "model")


def check_offload(offload) -> None:
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be None or 'model', got {offload!r}")


@contextlib.contextmanager
def placed(modules: list[nn.Module], device: torch.device, offload: bool):
    """With `offload`, the modules on `device` for the block and back in CPU memory after it; else as they are."""
    if not offload:
        yield
        return
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            module.to("cpu")
