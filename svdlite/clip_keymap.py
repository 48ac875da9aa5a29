"""CLIP key table: transformers `CLIPVisionModelWithProjection` (diffusers `image_encoder/`) <-> OpenCLIP visual names.

svdlite's image encoder is open_clip's `VisionTransformer`, so its names are the original single file's with
`ORIGINAL_PREFIX` stripped and load with no renaming. The diffusers layout goes through the one table below
(docs/model.md, same as ComfyUI `clip_vision.convert_to_transformers`): q/k/v are concatenated into
`in_proj_*` in that order (nn.MultiheadAttention's packing), `visual_projection.weight` is `proj` transposed
(Linear (out, in) vs `x @ proj` (in, out)), everything else is copied.
"""
from collections.abc import Callable, Mapping

import torch

from .clip import CLIPVisionConfig

ORIGINAL_PREFIX = "conditioner.embedders.0.open_clip.model.visual."
# In older transformers files, a persistent buffer holding arange(num_positions); not a weight.
IGNORED_TRANSFORMERS_KEYS = ("vision_model.embeddings.position_ids",)

_LAYER = "transformer.resblocks.{i}."  # OpenCLIP
_HF_LAYER = "vision_model.encoder.layers.{i}."  # transformers

# (OpenCLIP key, transformers keys it is made from, transform); transforms are defined below.
_GLOBAL = (
    ("class_embedding", ("vision_model.embeddings.class_embedding",), "copy"),
    ("conv1.weight", ("vision_model.embeddings.patch_embedding.weight",), "copy"),
    ("positional_embedding", ("vision_model.embeddings.position_embedding.weight",), "copy"),
    ("ln_pre.weight", ("vision_model.pre_layrnorm.weight",), "copy"),  # sic: "layrnorm" in transformers
    ("ln_pre.bias", ("vision_model.pre_layrnorm.bias",), "copy"),
    ("ln_post.weight", ("vision_model.post_layernorm.weight",), "copy"),
    ("ln_post.bias", ("vision_model.post_layernorm.bias",), "copy"),
    ("proj", ("visual_projection.weight",), "transpose"),
)
_PER_LAYER = (
    ("ln_1.weight", ("layer_norm1.weight",), "copy"),
    ("ln_1.bias", ("layer_norm1.bias",), "copy"),
    ("attn.in_proj_weight", tuple(f"self_attn.{p}_proj.weight" for p in "qkv"), "concat"),
    ("attn.in_proj_bias", tuple(f"self_attn.{p}_proj.bias" for p in "qkv"), "concat"),
    ("attn.out_proj.weight", ("self_attn.out_proj.weight",), "copy"),
    ("attn.out_proj.bias", ("self_attn.out_proj.bias",), "copy"),
    ("ln_2.weight", ("layer_norm2.weight",), "copy"),
    ("ln_2.bias", ("layer_norm2.bias",), "copy"),
    ("mlp.c_fc.weight", ("mlp.fc1.weight",), "copy"),
    ("mlp.c_fc.bias", ("mlp.fc1.bias",), "copy"),
    ("mlp.c_proj.weight", ("mlp.fc2.weight",), "copy"),
    ("mlp.c_proj.bias", ("mlp.fc2.bias",), "copy"),
)

# transform name -> (transformers tensors -> OpenCLIP tensor, OpenCLIP tensor -> transformers tensors)
_TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda ts: ts[0], lambda t: (t,)),
    "concat": (lambda ts: torch.cat(ts, dim=0), lambda t: tuple(c.clone() for c in t.chunk(3, dim=0))),
    "transpose": (lambda ts: ts[0].t().contiguous(), lambda t: (t.t().contiguous(),)),
}


def key_table(config: CLIPVisionConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """Every (OpenCLIP key, transformers keys, transform) row for `config`, OpenCLIP keys without prefix."""
    rows = list(_GLOBAL)
    for i in range(config.layers):
        rows += [(_LAYER.format(i=i) + ours, tuple(_HF_LAYER.format(i=i) + k for k in theirs), kind)
                 for ours, theirs, kind in _PER_LAYER]
    return rows


def transformers_keys(config: CLIPVisionConfig) -> list[str]:
    """The transformers tensors `openclip_from_transformers` reads (a loader need read no others)."""
    return [key for _, theirs, _ in key_table(config) for key in theirs]


def openclip_from_transformers(
    tensors: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor], config: CLIPVisionConfig
) -> dict[str, torch.Tensor]:
    """A transformers `CLIPVisionModelWithProjection` state dict as OpenCLIP visual tensors (no prefix).

    Args:
        tensors: the state dict, or a getter such as safetensors `safe_open(...).get_tensor`, called only for
            `transformers_keys(config)`. A dict must hold exactly those keys (plus `IGNORED_TRANSFORMERS_KEYS`).
        config: the tower's config (fixes the layer count).

    Returns:
        {OpenCLIP key: tensor}, ready for `build_image_encoder(config).load_state_dict(..., strict=True)`.
    """
    if isinstance(tensors, Mapping):
        needed = transformers_keys(config)
        missing = [k for k in needed if k not in tensors]
        unexpected = sorted(set(tensors) - set(needed) - set(IGNORED_TRANSFORMERS_KEYS))
        if missing or unexpected:
            raise ValueError(f"transformers CLIP state dict does not match {config}: {len(missing)} missing "
                             f"(first: {missing[:5]}), {len(unexpected)} unexpected (first: {unexpected[:5]})")
        get = tensors.__getitem__
    else:
        get = tensors
    return {ours: _TRANSFORMS[kind][0]([get(k) for k in theirs]) for ours, theirs, kind in key_table(config)}


def transformers_from_openclip(
    tensors: Mapping[str, torch.Tensor], config: CLIPVisionConfig
) -> dict[str, torch.Tensor]:
    """The inverse of `openclip_from_transformers` (OpenCLIP keys without prefix, exactly the table's keys)."""
    needed = [ours for ours, _, _ in key_table(config)]
    missing = [k for k in needed if k not in tensors]
    unexpected = sorted(set(tensors) - set(needed))
    if missing or unexpected:
        raise ValueError(f"OpenCLIP visual state dict does not match {config}: {len(missing)} missing "
                         f"(first: {missing[:5]}), {len(unexpected)} unexpected (first: {unexpected[:5]})")
    out = {}
    for ours, theirs, kind in key_table(config):
        out.update(zip(theirs, _TRANSFORMS[kind][1](tensors[ours]), strict=True))
    return out


def combiner(kind: str) -> Callable[..., torch.Tensor]:
    """The table's transform `kind` as a function of the transformers tensors (in table order) -> OpenCLIP tensor."""
    forward = _TRANSFORMS[kind][0]
    return lambda *tensors: forward(list(tensors))
