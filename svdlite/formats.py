"""Which checkpoint is this: its format, where each component's tensors are, and the networks it declares.

Formats (docs/design.md "Weights and formats"):
  original   one sgm single file (`svd*.safetensors`), UNet keys prefixed `model.diffusion_model.`;
  diffusers  a pipeline folder (`unet/`, `vae/`, `image_encoder/`), a `unet/` folder alone, or its
             `diffusion_pytorch_model[.fp16].safetensors` file (a config.json beside it is read);
  svdlite    a file written by tools/convert_weights.py (metadata `format=svdlite`, keys `<component>.<module key>`).
`open_model_source` is the one answer for every caller (load_model, load_unet, conversion, info): an svdlite file's
networks are in its metadata, a diffusers folder's in its config.json files, an original file's in its shapes.
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from . import clip_keymap, vae_keymap
from .checkpoint_file import CheckpointError
from .clip import CLIPVisionConfig
from .tensor_source import TensorSource
from .unet import UNetConfig
from .unet_keymap import ORIGINAL_PREFIX, unet_config_from_diffusers, unet_config_from_shapes
from .vae import VAEConfig

COMPONENTS = ("unet", "vae_encoder", "vae_decoder", "image_encoder")
SVDLITE_FORMAT = "svdlite"
SVDLITE_PREFIXES = {c: c + "." for c in COMPONENTS}  # svdlite file: `<component>.<module key>`
DIFFUSERS_FILES = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
                   "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
                   "image_encoder": ("model.safetensors", "model.fp16.safetensors")}
# svdlite files written by earlier converters say so in their metadata: their VideoResBlocks'
# `time_stack.out_layers.3` tensors hold (1 - alpha) W and b, the blend folded in; the model then scales by 1.0
BLEND_METADATA_KEY, BLEND_FOLDED = "unet_temporal_blend", "folded"


@dataclass
class ModelSource:
    """Where each component's tensors are, in which format, and the configs the checkpoint declares."""

    fmt: str
    files: dict[str, TensorSource]  # component -> source (several components may share one file)
    unet_config: UNetConfig
    vae_config: VAEConfig
    clip_config: CLIPVisionConfig
    preset: str
    path: Path
    frame_decoder: bool = False  # an *_image_decoder checkpoint: 2-D decoder run per frame (vae.FrameDecoder)


def open_model_source(path, preset: str | None = None, *, require_all: bool = True,
                      unet_config: UNetConfig | None = None) -> ModelSource:
    """Find the components in a file or folder. require_all=False (the converter, `load_unet`, `info`) accepts a
    source without some of them; the missing ones are then absent from `files`. unet_config: the UNet's network
    when the caller knows it (`load_unet(config=)`); by default the one the source declares."""
    path = Path(path)
    if path.is_dir():
        ms = _diffusers_source(path, path, diffusers_unet_files(path), preset, require_all)
    elif not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    else:
        src = TensorSource([path])
        fmt = detect_unet_format(src, path)
        if fmt == "diffusers":  # a diffusers UNet file alone: its config.json, if any, is beside it
            ms = _diffusers_source(path, path.parent, [path], preset, require_all, unet_src=src)
        elif fmt == SVDLITE_FORMAT:
            ms = _svdlite_source(path, src, preset, require_all)
        else:
            ms = _original_source(path, src, preset, require_all, unet_config)
    return ms if unet_config is None else dataclasses.replace(ms, unet_config=unet_config)


def diffusers_unet_files(folder: Path) -> list[Path] | None:
    """The UNet weight files of a diffusers pipeline folder or `unet/` folder (several for a sharded index)."""
    unet = folder / "unet" if (folder / "unet").is_dir() else folder
    for name in DIFFUSERS_FILES["unet"]:
        if (unet / name).is_file():
            return [unet / name]
        index = unet / (name + ".index.json")
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{index} is not a readable shard index (JSON whose weight_map names the "
                                      f"shard files; {err!r}); download or copy it again") from err
            return [unet / s for s in shards]
    return None


def detect_unet_format(src: TensorSource, path) -> str:
    """'original', 'diffusers' or 'svdlite', from the keys and metadata; an error for anything without an SVD UNet."""
    keys = src.keys()
    if src.metadata.get("format") == SVDLITE_FORMAT:
        fmt, temporal = SVDLITE_FORMAT, any(".time_stack." in k for k in keys)
    elif any(k.startswith(ORIGINAL_PREFIX) for k in keys):
        fmt, temporal = "original", any(k.startswith(ORIGINAL_PREFIX) and ".time_stack." in k for k in keys)
    elif "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
        fmt, temporal = "diffusers", any("temporal_" in k for k in keys)
    else:
        sample = ", ".join(sorted(keys)[:5])
        raise CheckpointError(f"{path}: no SVD UNet found: neither an original SVD file (keys '{ORIGINAL_PREFIX}*'), a "
                              f"diffusers UNet (conv_in.*, down_blocks.*) nor an svdlite file; first keys: {sample}")
    if not temporal:
        raise CheckpointError(f"{path}: this {fmt}-format UNet has no temporal layers (time_stack / temporal_*): it is "
                              "a Stable Diffusion image UNet, not Stable Video Diffusion")
    return fmt


def _first_file(folder: Path, names) -> list[Path] | None:
    for name in names:
        if (folder / name).is_file():
            return [folder / name]
    return None


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _diffusers_source(path: Path, folder: Path, unet_files, preset, require_all, unet_src=None) -> ModelSource:
    """A diffusers pipeline folder, `unet/` folder or UNet file; `folder` holds vae/ and image_encoder/ if any."""
    parts = {"unet": unet_files, "vae": _first_file(folder / "vae", DIFFUSERS_FILES["vae"]),
             "image_encoder": _first_file(folder / "image_encoder", DIFFUSERS_FILES["image_encoder"])}
    absent = [f"{k}/" for k, v in parts.items() if v is None]
    if parts["unet"] is None or (absent and require_all):
        pickles = sorted(str(f.relative_to(folder)) for k in absent for f in (folder / k).glob("*.bin"))
        raise CheckpointError(f"{path} is not a complete diffusers SVD folder: no weights in {', '.join(absent)}"
                              + (f" ({', '.join(pickles)} are pickle files, which svdlite never loads; use the "
                                 ".safetensors files of the same repository)" if pickles else ""))
    files = {"unet": unet_src or TensorSource(parts["unet"])}
    if parts["vae"]:
        files["vae_encoder"] = files["vae_decoder"] = TensorSource(parts["vae"])
    if parts["image_encoder"]:
        files["image_encoder"] = TensorSource(parts["image_encoder"])
    if unet_src is None:
        detect_unet_format(files["unet"], path)
    unet_params = _read_json(parts["unet"][0].parent / "config.json") or {}
    vae_params, clip_params = _read_json(folder / "vae" / "config.json"), _read_json(folder / "image_encoder" /
                                                                                     "config.json")
    guess = "svd" if unet_params.get("num_frames") == 14 else preset_from_name(path)
    return ModelSource("diffusers", files, unet_config_from_diffusers(unet_params) if unet_params else UNetConfig(),
                       vae_config_from_diffusers(vae_params) if vae_params else VAEConfig(),
                       CLIPVisionConfig.from_transformers(clip_params) if clip_params else CLIPVisionConfig(),
                       preset or guess, path)


def _svdlite_source(path: Path, src: TensorSource, preset, require_all) -> ModelSource:
    """An svdlite file: its components and networks are in its metadata (convert.config_metadata)."""
    meta = src.metadata
    present = meta.get("components", "unet").split(",")
    missing = [c for c in COMPONENTS if c not in present]
    if missing and require_all:
        raise CheckpointError(f"{path} is an svdlite file without {', '.join(missing)} (it holds {present}); "
                              "generation needs all four components")
    configs = {k: json.loads(meta[k]) if k in meta else None for k in ("unet_config", "vae_config", "clip_config")}
    return ModelSource(SVDLITE_FORMAT, {c: src for c in COMPONENTS},
                       UNetConfig.from_dict(configs["unet_config"]) if configs["unet_config"] else UNetConfig(),
                       VAEConfig.from_dict(configs["vae_config"]) if configs["vae_config"] else VAEConfig(),
                       CLIPVisionConfig(**configs["clip_config"]) if configs["clip_config"] else CLIPVisionConfig(),
                       preset or meta.get("preset", "svd-xt"), path, frame_decoder=meta.get("vae_decoder") == "frame")


def _original_source(path: Path, src: TensorSource, preset, require_all, unet_config=None) -> ModelSource:
    """An original single file: every component under its sgm prefix, the networks read from the shapes."""
    keys = src.keys()
    decoder_keys = [k for k in keys if k.startswith(vae_keymap.DECODER_PREFIX)]
    # *_image_decoder variants: a decoder without temporal layers, decoded frame by frame (vae.FrameDecoder)
    frame_decoder = bool(decoder_keys) and not any(".time_stack." in k or "time_mix_conv" in k for k in decoder_keys)
    needed = (("VAE decoder", vae_keymap.DECODER_PREFIX), ("VAE encoder", vae_keymap.ENCODER_PREFIX),
              ("CLIP image encoder", clip_keymap.ORIGINAL_PREFIX))
    for what, prefix in needed if require_all else ():
        if not any(k.startswith(prefix) for k in keys):
            raise CheckpointError(f"{path}: this original-format file has no {what} ({prefix}*)")
    return ModelSource("original", {c: src for c in COMPONENTS}, unet_config or _original_unet_config(src, path),
                       _original_vae_config(src), _original_clip_config(src), preset or preset_from_name(path), path,
                       frame_decoder=frame_decoder)


def preset_from_name(path: Path, default: str = "svd-xt") -> str:
    """The preset a released file's name says (svd_xt_1_1.safetensors: svd-xt-1.1), else `default`."""
    name = path.name.lower().replace("-", "_")
    for key, preset in (("xt_1_1", "svd-xt-1.1"), ("svd_xt", "svd-xt"), ("img2vid_xt", "svd-xt"), ("svd", "svd"),
                        ("img2vid", "svd")):
        if key in name:
            return preset
    return default


def _original_unet_config(src: TensorSource, path: Path) -> UNetConfig:
    """Read from the file's shapes; for every released SVD file this is UNetConfig()."""
    p = ORIGINAL_PREFIX
    try:
        return unet_config_from_shapes(lambda k: src.shape(p + k), lambda k: p + k in src.key_file)
    except (KeyError, ValueError, ZeroDivisionError, IndexError) as err:
        raise CheckpointError(f"{path}: cannot read the UNet's configuration from its shapes ({err}); for a network "
                              "other than SVD's, pass it (load_unet(path, config=UNetConfig(...)))") from err


def _original_vae_config(src: TensorSource) -> VAEConfig:
    p = vae_keymap.DECODER_PREFIX
    if p + "conv_in.weight" not in src.key_file:
        return VAEConfig()
    z = src.shape(p + "conv_in.weight")[1]
    ch = src.shape(p + "conv_out.weight")[1]
    levels = sum(p + f"up.{i}.block.0.conv1.weight" in src.key_file for i in range(16))
    mult = tuple(src.shape(p + f"up.{i}.block.0.conv2.weight")[0] // ch for i in range(levels))
    blocks = sum(p + f"up.0.block.{j}.conv1.weight" in src.key_file for j in range(16)) - 1
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=blocks, z_channels=z)


def _original_clip_config(src: TensorSource) -> CLIPVisionConfig:
    """Layer count from the file; the rest is ViT-H/14 (head width 80 is not visible in shapes)."""
    p = clip_keymap.ORIGINAL_PREFIX
    layers = sum(p + f"transformer.resblocks.{i}.ln_1.weight" in src.key_file for i in range(128))
    return CLIPVisionConfig(layers=layers) if layers else CLIPVisionConfig()


def vae_config_from_diffusers(params: dict) -> VAEConfig:
    """VAEConfig from a diffusers `vae/config.json` (AutoencoderKLTemporalDecoder)."""
    widths = list(params.get("block_out_channels", (128, 256, 512, 512)))
    if any(w % widths[0] for w in widths):
        raise ValueError(f"VAE block_out_channels {widths} are not multiples of the first")
    return VAEConfig(ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths),
                     num_res_blocks=params.get("layers_per_block", 2), z_channels=params.get("latent_channels", 4),
                     in_channels=params.get("in_channels", 3), out_ch=params.get("out_channels", 3),
                     scale_factor=params.get("scaling_factor", 0.18215))


def blend_is_stored_folded(src: TensorSource) -> bool:
    """Whether this file's VideoResBlocks' temporal convs are stored with the blend folded in (older svdlite files)."""
    return src.metadata.get(BLEND_METADATA_KEY) == BLEND_FOLDED
