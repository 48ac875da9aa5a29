"""Reading checkpoints: format detection, selective safetensors reads, strict loading with errors that name keys.

Formats (DESIGN.md "Weights and formats"):
  original   one sgm single file (`svd*.safetensors`), UNet keys prefixed `model.diffusion_model.`;
  diffusers  a pipeline folder with `unet/`, a `unet/` folder, or its `diffusion_pytorch_model[.fp16].safetensors`;
  svdlite    a file written by tools/convert_weights.py (metadata `format=svdlite`, UNet keys prefixed `unet.`).
Only the tensors a model needs are read (safetensors `safe_open`); every read is recorded in `TensorSource.reads`.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .unet import UNetConfig, VideoUNet
from .unet_keymap import (ORIGINAL_PREFIX, diffusers_unet_names, fold_sources, original_unet_keys,
                          unet_config_from_diffusers)

SVDLITE_FORMAT = "svdlite"
SVDLITE_UNET_PREFIX = "unet."
DIFFUSERS_UNET_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: wrong format, missing/unexpected/misshapen tensors, unreadable file."""


class TensorSource:
    """Lazy access to the tensors of one or more safetensors files (several for a sharded diffusers folder)."""

    def __init__(self, files: list[Path]):
        self.files, self.key_file, self.metadata, self.reads = files, {}, {}, []
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: no such file")
            try:
                with safe_open(str(f), framework="pt") as h:
                    self.metadata.update(h.metadata() or {})
                    self.key_file.update({k: f for k in h.keys()})
            except (SafetensorError, OSError, ValueError, RuntimeError) as err:
                raise CheckpointError(f"{f} is not a readable safetensors file ({err}); svdlite reads .safetensors "
                                      "checkpoints only (original single file, diffusers folder or converted)") from err

    def keys(self) -> set[str]:
        return set(self.key_file)

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(str(self.key_file[key]), framework="pt") as h:
            return tuple(h.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        self.reads.append(key)
        try:
            with safe_open(str(self.key_file[key]), framework="pt") as h:
                return h.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{self.key_file[key]}: cannot read tensor {key!r} ({err}); truncated file?") from err


def _diffusers_unet_files(folder: Path) -> list[Path] | None:
    unet = folder / "unet" if (folder / "unet").is_dir() else folder
    for name in DIFFUSERS_UNET_FILES:
        if (unet / name).is_file():
            return [unet / name]
        index = unet / (name + ".index.json")
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [unet / s for s in shards]
    return None


def open_unet_source(source) -> tuple[TensorSource, str]:
    """Open a UNet checkpoint and detect its format: returns (source, 'original' | 'diffusers' | 'svdlite')."""
    path = Path(source)
    if path.is_dir():
        files = _diffusers_unet_files(path)
        if files is None:
            raise CheckpointError(f"{path} is a folder without a diffusers UNet (expected unet/{DIFFUSERS_UNET_FILES[0]} "
                                  "or .fp16 variant, or a sharded index)")
        src = TensorSource(files)
    elif path.is_file():
        src = TensorSource([path])
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    return src, detect_unet_format(src, path)


def detect_unet_format(src: TensorSource, path) -> str:
    keys = src.keys()
    if src.metadata.get("format") == SVDLITE_FORMAT:
        fmt, temporal = "svdlite", any(".time_stack." in k for k in keys)
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


def _source_names(fmt: str, config: UNetConfig, svdlite_keys) -> dict[str, str]:
    """{original sgm key (unprefixed): key in the file} for every original tensor of this network."""
    keys = original_unet_keys(svdlite_keys)
    if fmt == "original":
        return {k: ORIGINAL_PREFIX + k for k in keys}
    if fmt == "diffusers":
        return diffusers_unet_names(config, keys)
    raise AssertionError(fmt)


def unet_read_plan(fmt: str, config: UNetConfig, expected: dict[str, tuple]) -> dict[str, tuple[str, ...]]:
    """{svdlite key: file keys it is computed from}; folded tensors come from two attn2 tensors."""
    if fmt == SVDLITE_FORMAT:
        return {k: (SVDLITE_UNET_PREFIX + k,) for k in expected}
    names = _source_names(fmt, config, expected)
    return {k: tuple(names[s] for s in fold_sources(k)) for k in expected}


def expected_unet_source_keys(fmt: str, config: UNetConfig = UNetConfig()) -> set[str]:
    """Every key the loader reads from a file of this format (excludes the never-read attn2 to_q / to_k)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VideoUNet(config).state_dict().items()}
    return {s for srcs in unet_read_plan(fmt, config, shapes).values() for s in srcs}


def _unet_file_keys(fmt: str, keys: set[str]) -> set[str]:
    if fmt == "original":
        return {k for k in keys if k.startswith(ORIGINAL_PREFIX)}
    if fmt == SVDLITE_FORMAT:
        return {k for k in keys if k.startswith(SVDLITE_UNET_PREFIX)}
    return keys


def _fmt_keys(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_unet_state_dict(src: TensorSource, fmt: str, config: UNetConfig, expected: dict[str, tuple],
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read, fold and shape-check every tensor; raise one CheckpointError naming all problems."""
    plan = unet_read_plan(fmt, config, expected)
    available = src.keys()
    needed = {s for srcs in plan.values() for s in srcs}
    ignored = set()
    if fmt != SVDLITE_FORMAT:
        all_original = _source_names(fmt, config, expected)
        ignored = set(all_original.values()) - needed
    missing = needed - available
    unexpected = _unet_file_keys(fmt, available) - needed - ignored
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {_fmt_keys(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected: {_fmt_keys(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{fmt}-format UNet does not match UNetConfig(model_channels={config.model_channels}, "
                              f"channel_mult={config.channel_mult}, ...): " + "; ".join(parts))
    wrong = []
    for key, srcs in plan.items():
        if len(srcs) == 1:
            shape = src.shape(srcs[0])
        else:  # W_out (C, C') @ W_v (C', D)
            a, b = src.shape(srcs[0]), src.shape(srcs[1])
            shape = (a[0], b[1]) if len(a) == len(b) == 2 and a[1] == b[0] else ("incompatible", a, b)
        if shape != expected[key]:
            wrong.append(f"{srcs[0]}: file {shape}, expected {expected[key]}")
    if wrong:
        raise CheckpointError(f"{len(wrong)} tensors of the {fmt}-format UNet have the wrong shape for UNetConfig("
                              f"model_channels={config.model_channels}, ...): " + "; ".join(wrong[:8]))
    state = {}
    for key, srcs in plan.items():
        if len(srcs) == 1:
            state[key] = src.get(srcs[0]).to(dtype)
        else:  # fold in float64, then round once to the target dtype
            state[key] = (src.get(srcs[0]).double() @ src.get(srcs[1]).double()).to(dtype)
    return state


def _stored_config(src: TensorSource, fmt: str) -> UNetConfig:
    """The network a file declares: svdlite metadata, a diffusers config.json beside the weights, else SVD's."""
    if fmt == SVDLITE_FORMAT and "unet_config" in src.metadata:
        return UNetConfig.from_dict(json.loads(src.metadata["unet_config"]))
    config_json = src.files[0].parent / "config.json"
    if fmt == "diffusers" and config_json.is_file():
        return unet_config_from_diffusers(json.loads(config_json.read_text()))
    return UNetConfig()


def load_unet(source, config: UNetConfig | None = None, *, device="cpu", dtype: torch.dtype = torch.float32,
              return_source: bool = False):
    """Build `VideoUNet` on the meta device and load it strictly from `source` (file or folder, format detected).

    config: the network; by default the one the checkpoint declares (svdlite metadata, diffusers config.json),
    else SVD's (`UNetConfig()`).
    Cross-attention weights are folded while loading; attn2 `to_q`/`to_k` are never read.
    """
    src, fmt = open_unet_source(source)
    if config is None:
        config = _stored_config(src, fmt)
    with torch.device("meta"):
        model = VideoUNet(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = read_unet_state_dict(src, fmt, config, expected, dtype)
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(f"parameters left unloaded: {_fmt_keys(still_meta)}")
    model.eval().requires_grad_(False)
    return (model, src) if return_source else model
