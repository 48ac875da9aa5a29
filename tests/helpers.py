"""Test helpers: synthetic checkpoints in the original sgm layout, made from a config (nothing downloaded)."""
import math

import torch
from safetensors.torch import save_file

from svdlite import UNetConfig, VideoUNet
from svdlite.unet_keymap import ORIGINAL_PREFIX, original_unet_keys


def original_unet_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    """{sgm key (unprefixed): shape} of the original VideoUNet for `config`, cross-attention tensors included."""
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in VideoUNet(config).state_dict().items()}
    shapes = {}
    for key in original_unet_keys(ours):
        if ".attn2." not in key:
            shapes[key] = ours[key]
            continue
        base, leaf = key.split(".attn2.")
        c, d = ours[base + ".attn2_fold.weight"]
        shapes[key] = {"to_q.weight": (c, c), "to_k.weight": (c, d), "to_v.weight": (c, d),
                       "to_out.0.weight": (c, c), "to_out.0.bias": (c,)}[leaf]
    return shapes


def random_tensors(shapes: dict, seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor live (the reference's recipe): norms ~1, biases small, weights ~ 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        r = torch.randn(shape, generator=g)
        if key.endswith("mix_factor"):
            v = 0.3 + 0.5 * r
        elif len(shape) == 1 and key.endswith("weight"):
            v = 1.0 + 0.1 * r
        elif key.endswith("bias"):
            v = 0.05 * r
        else:
            v = r / math.sqrt(math.prod(shape[1:]))
        out[key] = v.to(dtype).contiguous()
    return out


def write_original_unet(path, config: UNetConfig, seed: int = 0, dtype=torch.float32, edit=None) -> dict:
    """Write an original-layout single file (`model.diffusion_model.*`); `edit(dict)` may alter it first."""
    tensors = {ORIGINAL_PREFIX + k: v for k, v in random_tensors(original_unet_shapes(config), seed, dtype).items()}
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(path))
    return tensors


TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), num_head_channels=16, context_dim=24, adm_in_channels=12,
                  attention_resolutions=(1,))
