"""Random-weight checkpoints for tests, benchmarks and the bundled tiny model (never for real use).

`random_tensors` follows the recipe of shared/reference/materialize.py, so every branch is live (sgm's own
zero-inits would hide mistakes): norm scales ~1, biases small, weights ~ N(0, 1/fan_in), mix factors ~0.3.
"""
import math

import torch

from .unet import UNetConfig, VideoUNet
from .unet_keymap import original_unet_keys


def random_tensors(shapes: dict, seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """{key: tensor} for {key: shape}, drawn in sorted key order from one generator seeded `seed`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        r = torch.randn(tuple(shape), generator=g)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "mix_factor":
            v = 0.3 + 0.5 * r
        elif len(shape) == 1 and leaf == "weight":
            v = 1.0 + 0.1 * r
        elif leaf == "bias":
            v = 0.05 * r
        else:
            v = r / math.sqrt(math.prod(shape[1:]))
        out[key] = v.to(dtype).contiguous()
    return out


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
