"""VAE key tables: original sgm names (= svdlite module names) <-> diffusers `AutoencoderKLTemporalDecoder` names.

svdlite's `Encoder`, `quant_conv` and `VideoDecoder` use the sgm keys with the file prefixes below stripped.
The diffusers layout is one declarative table, built from a `VAEConfig` by index arithmetic (docs/model.md):
sgm `up.L` is diffusers `up_blocks.(levels-1-L)`; the mid-block attention's 1x1 convs are diffusers Linears,
the only tensors that change shape (`to_original_shape` / `to_diffusers_shape`).
Diffusers' temporal decoder gives its mid block `layers_per_block` resnets (of which it runs two), so its layout
equals sgm's only for num_res_blocks = 2, SVD's value; `original_from_diffusers` rejects any other by key mismatch.
"""
import torch

from .vae import VAEConfig

# Prefixes of the original single-file checkpoint (svd*.safetensors)
ENCODER_PREFIX = "conditioner.embedders.3.encoder.encoder."  # the encoder SVD runs (conditioning latent)
QUANT_CONV_PREFIX = "conditioner.embedders.3.encoder.quant_conv."
DECODER_PREFIX = "first_stage_model.decoder."
FRAME_DECODER_PREFIX = "first_stage_model."  # *_image_decoder files: `decoder.*` (2-D) and `post_quant_conv.*`
FIRST_STAGE_ENCODER_PREFIX = "first_stage_model.encoder."  # a second encoder copy, unused at inference
# Prefixes of the diffusers `vae/` state dict
DIFFUSERS_ENCODER_PREFIX = "encoder."
DIFFUSERS_QUANT_CONV_PREFIX = "quant_conv."
DIFFUSERS_DECODER_PREFIX = "decoder."

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VIDEO_RESNET = {
    **{k: f"spatial_res_block.{v}" for k, v in _RESNET.items()},
    "time_stack.in_layers.0": "temporal_res_block.norm1",
    "time_stack.in_layers.2": "temporal_res_block.conv1",
    "time_stack.out_layers.0": "temporal_res_block.norm2",
    "time_stack.out_layers.3": "temporal_res_block.conv2",
}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_CONV_AS_LINEAR = ("q", "k", "v", "proj_out")  # (C, C, 1, 1) in sgm, (C, C) in diffusers


def _resnet(sgm: str, diffusers: str, has_shortcut: bool, video: bool) -> dict[str, str]:
    """The keys of one ResnetBlock (or VideoResBlock); `nin_shortcut` only where the channel count changes."""
    inner = _VIDEO_RESNET if video else _RESNET
    out = {f"{sgm}.{src}.{leaf}": f"{diffusers}.{dst}.{leaf}"
           for src, dst in inner.items() if has_shortcut or src != "nin_shortcut" for leaf in ("weight", "bias")}
    if video:
        out[f"{sgm}.mix_factor"] = f"{diffusers}.time_mixer.mix_factor"
    return out


def _modules(pairs: dict[str, str]) -> dict[str, str]:
    """weight and bias of each plain module (conv or norm) in `{sgm module: diffusers module}`."""
    return {f"{s}.{leaf}": f"{d}.{leaf}" for s, d in pairs.items() for leaf in ("weight", "bias")}


def _mid(video: bool) -> dict[str, str]:
    """mid.block_1, mid.attn_1, mid.block_2 (the same in the encoder and the decoder, apart from the resnet kind)."""
    out = _resnet("mid.block_1", "mid_block.resnets.0", False, video)
    out.update(_modules({f"mid.attn_1.{s}": f"mid_block.attentions.0.{d}" for s, d in _ATTN.items()}))
    out.update(_resnet("mid.block_2", "mid_block.resnets.1", False, video))
    return out


def encoder_key_map(cfg: VAEConfig) -> dict[str, str]:
    """{sgm Encoder key: diffusers `Encoder` key}, both without prefix."""
    widths = cfg.widths
    out = _modules({"conv_in": "conv_in"})
    c = cfg.ch
    for i, width in enumerate(widths):
        for j in range(cfg.num_res_blocks):
            out.update(_resnet(f"down.{i}.block.{j}", f"down_blocks.{i}.resnets.{j}", c != width, video=False))
            c = width
        if i != len(widths) - 1:
            out.update(_modules({f"down.{i}.downsample.conv": f"down_blocks.{i}.downsamplers.0.conv"}))
    out.update(_mid(video=False))
    out.update(_modules({"norm_out": "conv_norm_out", "conv_out": "conv_out"}))
    return out


def decoder_key_map(cfg: VAEConfig) -> dict[str, str]:
    """{sgm VideoDecoder key: diffusers `TemporalDecoder` key}, both without prefix."""
    widths, levels = cfg.widths, len(cfg.widths)
    out = _modules({"conv_in": "conv_in"})
    out.update(_mid(video=True))
    c = widths[-1]
    for level in reversed(range(levels)):
        b = levels - 1 - level  # diffusers counts up blocks in execution order
        for j in range(cfg.num_res_blocks + 1):
            out.update(_resnet(f"up.{level}.block.{j}", f"up_blocks.{b}.resnets.{j}", c != widths[level],
                               video=True))
            c = widths[level]
        if level != 0:
            out.update(_modules({f"up.{level}.upsample.conv": f"up_blocks.{b}.upsamplers.0.conv"}))
    out.update(_modules({"norm_out": "conv_norm_out", "conv_out": "conv_out",
                         "conv_out.time_mix_conv": "time_conv_out"}))
    return out


def vae_key_map(cfg: VAEConfig = VAEConfig()) -> dict[str, str]:
    """{full original key: full diffusers key} for the encoder SVD uses, its quant_conv and the video decoder."""
    out = {ENCODER_PREFIX + s: DIFFUSERS_ENCODER_PREFIX + d for s, d in encoder_key_map(cfg).items()}
    out.update({QUANT_CONV_PREFIX + leaf: DIFFUSERS_QUANT_CONV_PREFIX + leaf for leaf in ("weight", "bias")})
    out.update({DECODER_PREFIX + s: DIFFUSERS_DECODER_PREFIX + d for s, d in decoder_key_map(cfg).items()})
    return out


def _is_attn_conv(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 4 and parts[-4:-2] == ["mid", "attn_1"] and parts[-2] in _CONV_AS_LINEAR \
        and parts[-1] == "weight"


def to_original_shape(original_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A diffusers tensor in the shape of the original key it maps to: Linear (C, C) -> 1x1 conv (C, C, 1, 1)."""
    return tensor[:, :, None, None] if _is_attn_conv(original_key) and tensor.ndim == 2 else tensor


def to_diffusers_shape(original_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """An original tensor in diffusers' shape: 1x1 conv (C, C, 1, 1) -> Linear (C, C)."""
    return tensor[:, :, 0, 0] if _is_attn_conv(original_key) and tensor.ndim == 4 else tensor


def original_from_diffusers(cfg: VAEConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers `vae/` state dict as the original single file's VAE tensors (full sgm keys, sgm shapes).

    Strict: every table key must be present and every diffusers tensor used; otherwise ValueError naming keys.
    """
    table = vae_key_map(cfg)
    missing = sorted(d for d in table.values() if d not in state_dict)
    unexpected = sorted(set(state_dict) - set(table.values()))
    if missing or unexpected:
        raise ValueError(f"diffusers VAE state dict does not match VAEConfig {cfg}: {len(missing)} missing "
                         f"(first: {missing[:5]}), {len(unexpected)} unexpected (first: {unexpected[:5]})")
    return {s: to_original_shape(s, state_dict[d]) for s, d in table.items()}
