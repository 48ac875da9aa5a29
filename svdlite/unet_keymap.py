"""UNet key tables: which original tensors each svdlite tensor comes from, and the diffusers names of the originals.

svdlite's UNet names are the original sgm names (`model.diffusion_model.` stripped), except that each
cross-attention `attn2.{to_q,to_k,to_v,to_out.0}` is replaced by the folded `attn2_fold` or keeps only
`attn2.{to_v,to_out.0}` (`fold_product=False`, see unet_blocks.py).
The diffusers layout (`UNetSpatioTemporalConditionModel`) is one declarative table built by index arithmetic
from the config (docs/model.md "Checkpoints and key names"); nothing is reshaped.
"""
from .unet import UNetConfig

ORIGINAL_PREFIX = "model.diffusion_model."

# svdlite tensor -> the original tensors it is computed from (suffixes of the same block); fold = product in order
FOLD_SOURCES = {
    "attn2_fold.weight": ("attn2.to_out.0.weight", "attn2.to_v.weight"),
    "attn2_fold.bias": ("attn2.to_out.0.bias",),
}
# Original tensors that never influence the output (softmax over one key is 1), hence never read.
NEVER_READ_SUFFIXES = ("attn2.to_q.weight", "attn2.to_k.weight")


def fold_sources(key: str) -> tuple[str, ...]:
    """The original (sgm) keys an svdlite UNet key is read from: itself, or the attn2 tensors it folds."""
    for suffix, sources in FOLD_SOURCES.items():
        if key.endswith(suffix):
            base = key[: -len(suffix)]
            return tuple(base + s for s in sources)
    return (key,)


def original_unet_keys(svdlite_keys) -> list[str]:
    """The full original key list (sgm names, no prefix) of the network whose svdlite keys are given."""
    out, keys = [], set(svdlite_keys)
    for key in svdlite_keys:
        if key.endswith("attn2.to_v.weight"):  # a SingleTokenAttention (no to_q / to_k) or the ablation's attention
            base = key[: -len("attn2.to_v.weight")]
            out += [base + s for s in NEVER_READ_SUFFIXES if base + s not in keys] + [key]
        elif key.endswith("attn2_fold.weight"):
            base = key[: -len("attn2_fold.weight")]
            out += [base + s for s in NEVER_READ_SUFFIXES]
            out += [base + "attn2.to_v.weight", base + "attn2.to_out.0.weight"]
        elif key.endswith("attn2_fold.bias"):
            out.append(key[: -len("attn2_fold.bias")] + "attn2.to_out.0.bias")
        else:
            out.append(key)
    return out


_RESNET = {  # inside a VideoResBlock
    "in_layers.0": "spatial_res_block.norm1",
    "in_layers.2": "spatial_res_block.conv1",
    "emb_layers.1": "spatial_res_block.time_emb_proj",
    "out_layers.0": "spatial_res_block.norm2",
    "out_layers.3": "spatial_res_block.conv2",
    "skip_connection": "spatial_res_block.conv_shortcut",
    "time_stack.in_layers.0": "temporal_res_block.norm1",
    "time_stack.in_layers.2": "temporal_res_block.conv1",
    "time_stack.emb_layers.1": "temporal_res_block.time_emb_proj",
    "time_stack.out_layers.0": "temporal_res_block.norm2",
    "time_stack.out_layers.3": "temporal_res_block.conv2",
    "time_mixer": "time_mixer",
}
_TRANSFORMER = {  # inside a SpatialVideoTransformer; everything else keeps its name
    "time_stack": "temporal_transformer_blocks",
    "time_pos_embed.0": "time_pos_embed.linear_1",
    "time_pos_embed.2": "time_pos_embed.linear_2",
}


def _block_table(cfg: UNetConfig) -> dict[str, tuple[str, dict | None]]:
    """sgm module prefix -> (diffusers prefix, inner suffix table or None for a plain rename)."""
    levels, nrb = len(cfg.channel_mult), cfg.num_res_blocks
    table = {
        "time_embed.0": ("time_embedding.linear_1", None), "time_embed.2": ("time_embedding.linear_2", None),
        "label_emb.0.0": ("add_embedding.linear_1", None), "label_emb.0.2": ("add_embedding.linear_2", None),
        "input_blocks.0.0": ("conv_in", None), "out.0": ("conv_norm_out", None), "out.2": ("conv_out", None),
        "middle_block.0": ("mid_block.resnets.0", _RESNET), "middle_block.1": ("mid_block.attentions.0", _TRANSFORMER),
        "middle_block.2": ("mid_block.resnets.1", _RESNET),
    }
    n, ds = 1, 1
    for b in range(levels):
        for j in range(nrb):
            table[f"input_blocks.{n}.0"] = (f"down_blocks.{b}.resnets.{j}", _RESNET)
            if ds in cfg.attention_resolutions:
                table[f"input_blocks.{n}.1"] = (f"down_blocks.{b}.attentions.{j}", _TRANSFORMER)
            n += 1
        if b != levels - 1:
            table[f"input_blocks.{n}.0.op"] = (f"down_blocks.{b}.downsamplers.0.conv", None)
            n, ds = n + 1, ds * 2
    n = 0
    for b in range(levels):  # diffusers up_blocks.b is the sgm level levels-1-b
        has_attn = ds in cfg.attention_resolutions
        for j in range(nrb + 1):
            table[f"output_blocks.{n}.0"] = (f"up_blocks.{b}.resnets.{j}", _RESNET)
            if has_attn:
                table[f"output_blocks.{n}.1"] = (f"up_blocks.{b}.attentions.{j}", _TRANSFORMER)
            n += 1
        if b != levels - 1:
            table[f"output_blocks.{n - 1}.{1 + has_attn}.conv"] = (f"up_blocks.{b}.upsamplers.0.conv", None)
            ds //= 2
    return table


def _longest_prefix(key: str, table: dict):
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in table:
            return prefix, ".".join(parts[i:])
    raise KeyError(key)


def diffusers_unet_names(cfg: UNetConfig, original_keys) -> dict[str, str]:
    """{sgm key: diffusers key} for the given original (sgm, unprefixed) keys."""
    blocks = _block_table(cfg)
    names = {}
    for key in original_keys:
        prefix, rest = _longest_prefix(key, blocks)
        target, inner = blocks[prefix]
        if inner is not None:
            try:
                sub, tail = _longest_prefix(rest, inner)
                rest = inner[sub] + ("." + tail if tail else "")
            except KeyError:
                pass  # same name on both sides (norm, proj_in, transformer_blocks.*, ...)
        names[key] = target + ("." + rest if rest else "")
    return names


def unet_config_from_diffusers(params: dict) -> UNetConfig:
    """UNetConfig from a diffusers `unet/config.json` (UNetSpatioTemporalConditionModel)."""
    widths = list(params.get("block_out_channels", (320, 640, 1280, 1280)))
    heads = params.get("num_attention_heads", (5, 10, 20, 20))
    heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    levels = len(widths)
    down = list(params.get("down_block_types", ["CrossAttnDownBlockSpatioTemporal"] * (levels - 1)
                           + ["DownBlockSpatioTemporal"]))
    if down != ["CrossAttnDownBlockSpatioTemporal"] * (levels - 1) + ["DownBlockSpatioTemporal"]:
        raise ValueError(f"unsupported diffusers down_block_types {down}: SVD's layout has attention at every "
                         "level but the deepest")
    head_dims = {w // h for w, h in zip(widths, heads)}
    if len(head_dims) != 1 or any(w % h for w, h in zip(widths, heads)):
        raise ValueError(f"block_out_channels {widths} / num_attention_heads {heads} do not give one head width")
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first")
    depth = params.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        depth = set(depth)
        if len(depth) != 1:
            raise ValueError(f"transformer_layers_per_block {sorted(depth)} differ by level; SVD uses one depth")
        depth = depth.pop()
    return UNetConfig(
        in_channels=params.get("in_channels", 8), out_channels=params.get("out_channels", 4),
        model_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
        attention_resolutions=tuple(2 ** i for i in reversed(range(levels - 1))),
        num_res_blocks=params.get("layers_per_block", 2), num_head_channels=head_dims.pop(),
        transformer_depth=depth, context_dim=params.get("cross_attention_dim", 1024),
        adm_in_channels=params.get("projection_class_embeddings_input_dim", 768))


def unet_config_from_shapes(shape, has) -> UNetConfig:
    """The network an original-layout state dict describes, read from a few shapes (ComfyUI-style detection).

    shape(key) -> tuple and has(key) -> bool take unprefixed sgm keys. Head width cannot be seen in shapes:
    it is taken as SVD's 64 (num_head_channels); every released SVD checkpoint uses it."""
    mc, in_ch = shape("input_blocks.0.0.weight")[:2]
    ops = sorted(int(k) for k in range(1, 64) if has(f"input_blocks.{k}.0.op.weight"))
    nrb = ops[0] - 1 if ops else sum(has(f"input_blocks.{i}.0.in_layers.2.weight") for i in range(1, 64))
    levels = len(ops) + 1
    first = [1 + level * (nrb + 1) for level in range(levels)]  # first res block of each level
    mult = tuple(shape(f"input_blocks.{i}.0.out_layers.3.weight")[0] // mc for i in first)
    attn = tuple(2 ** level for level in reversed(range(levels))
                 if has(f"input_blocks.{first[level]}.1.proj_in.weight"))
    depth = sum(has(f"middle_block.1.transformer_blocks.{d}.norm1.weight") for d in range(16))
    context = shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    return UNetConfig(in_channels=in_ch, out_channels=shape("out.2.weight")[0], model_channels=mc,
                      channel_mult=mult, num_res_blocks=nrb, attention_resolutions=attn or (4, 2, 1),
                      transformer_depth=depth or 1, context_dim=context,
                      adm_in_channels=shape("label_emb.0.0.weight")[1])


def diffusers_unet_params(config: UNetConfig, frames: int) -> dict:
    """`UNetSpatioTemporalConditionModel` keyword arguments for the network `config` describes (the inverse of
    `unet_config_from_diffusers`, checked against it); for the tools and tests that build diffusers' UNet."""
    levels = len(config.channel_mult)
    if sorted(config.attention_resolutions) != [2 ** i for i in range(levels - 1)]:
        raise ValueError(f"diffusers' SVD UNet has attention at every level but the deepest; attention_resolutions "
                         f"{config.attention_resolutions} with {levels} levels is not expressible")
    if config.adm_in_channels % 6:
        raise ValueError(f"adm_in_channels {config.adm_in_channels} must be 3 even-sized embeddings")
    widths = tuple(config.model_channels * m for m in config.channel_mult)
    kwargs = dict(
        in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) * (levels - 1) + ("DownBlockSpatioTemporal",),
        up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * (levels - 1),
        block_out_channels=widths, addition_time_embed_dim=config.adm_in_channels // 3,
        projection_class_embeddings_input_dim=config.adm_in_channels, layers_per_block=config.num_res_blocks,
        cross_attention_dim=config.context_dim, transformer_layers_per_block=config.transformer_depth,
        num_attention_heads=tuple(w // config.num_head_channels for w in widths), num_frames=frames)
    if unet_config_from_diffusers(kwargs) != config:
        raise AssertionError(f"diffusers kwargs {kwargs} do not describe {config}")
    return kwargs
