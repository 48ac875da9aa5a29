"""Reading checkpoints: format detection, selective safetensors reads, strict loading with errors that name keys.

Formats (docs/design.md "Weights and formats"):
  original   one sgm single file (`svd*.safetensors`), UNet keys prefixed `model.diffusion_model.`;
  diffusers  a pipeline folder with `unet/`, a `unet/` folder, or its `diffusion_pytorch_model[.fp16].safetensors`;
  svdlite    a file written by tools/convert_weights.py (metadata `format=svdlite`, UNet keys prefixed `unet.`).
Only the tensors a model needs are read; every read is recorded in `TensorSource.reads`. Each tensor is read once,
straight into its final dtype and device: a tensor already in that dtype is the file's own memory map (no copy),
any other is converted piecewise from a read-only memory map into a new tensor of the final dtype, each piece's
pages dropped from the process once converted, so the file never counts towards the process's memory and the
model is never held twice (peak = the loaded model + one piece).
"""
import contextlib
import gc
import json
import mmap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .checkpoint_file import EXPECTED, FLOAT_DTYPES, CheckpointError, read_header
from .unet import UNetConfig, VideoUNet
from .unet_keymap import (ORIGINAL_PREFIX, diffusers_unet_names, fold_sources, original_unet_keys,
                          unet_config_from_diffusers)

SVDLITE_FORMAT = "svdlite"
SVDLITE_UNET_PREFIX = "unet."
DIFFUSERS_UNET_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


# safetensors dtype names -> torch dtypes (the format's header, https://github.com/huggingface/safetensors)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
READ_BUFFER_BYTES = 32 << 20  # converted reads go piecewise: at most this much of a file is mapped at once
# svdlite writes its files with every tensor at this alignment (that of torch's own allocations). Tensors of other
# files are used in place from the memory map at whatever alignment they have (safetensors guarantees only the
# element's): copying them would cost a second checkpoint's worth of fresh memory. The values are the same; the
# outputs agree to float32 rounding, not always to the bit (some CPU kernels round differently on differently
# aligned weights: a 1x1 convolution at one thread, 1.3e-6; tests/test_loading.py).
ALIGNMENT = 64
PROGRESS_BYTES = 16 << 20  # `load_planned` reports its reads to a progress bar in steps of about this many bytes


class TensorSource:
    """Lazy access to the tensors of one or more safetensors files (several for a sharded diffusers folder)."""

    def __init__(self, files: list[Path]):
        self.files, self.key_file, self.metadata, self.reads, self._handles = files, {}, {}, [], {}
        self._layout: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # key -> (dtype, shape, offset, end)
        self._maps: dict[Path, mmap.mmap] = {}  # read-only maps for converted reads (`_read_converted`)
        self._private: dict[Path, torch.Tensor] = {}  # each file as bytes over a private map (`_file_bytes`)
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: no such file")
            header, base = read_header(f)  # not safetensors, truncated, corrupt: named before safe_open
            self._layout.update(_layout(header, base))
            try:
                h = self._handles[f] = safe_open(str(f), framework="pt")
                self.metadata.update(h.metadata() or {})
                self.key_file.update({k: f for k in h.keys()})
            except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as err:
                raise CheckpointError(f"{f} is not a readable safetensors file ({err}); {EXPECTED}") from err

    def keys(self) -> set[str]:
        return set(self.key_file)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._layout[key][1]

    def nbytes(self, key: str) -> int:
        """The tensor's size in the file, in bytes."""
        _, _, start, end = self._layout[key]
        return end - start

    def dtype(self, key: str) -> str:
        """The stored dtype, as safetensors names it (F32, F16, BF16, I64, ...)."""
        return self._layout[key][0]

    def get(self, key: str, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        """Read one tensor (recorded in `reads`) as `dtype` (default: the file's) on `device`.

        In the file's dtype on the CPU it is the file's memory map (no copy; a private map: writing to it copies
        the pages written, never the file); otherwise it is converted once, in pieces of READ_BUFFER_BYTES, into a
        new tensor of `dtype` on `device`."""
        self.reads.append(key)
        file = self.key_file[key]
        name, shape, start, end = self._layout[key]
        stored = SAFETENSORS_DTYPES.get(name)
        try:
            if stored is None:
                return self._handles[file].get_tensor(key).to(device=device, dtype=dtype)
            dtype = stored if dtype is None else dtype
            if dtype == stored and torch.device(device).type == "cpu":
                if start % stored.itemsize:  # not at its element's alignment in the file: safetensors copies it
                    return self._handles[file].get_tensor(key)
                data = self._file_bytes(file)
                if end > data.numel():
                    raise CheckpointError(f"{file}: file ends inside tensor {key!r}; truncated file?")
                return data[start:end].view(stored).view(shape)
            out = torch.empty(shape, dtype=dtype, device=device)
            self._read_converted(file, stored, start, end, out.view(-1))
            return out
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{file}: cannot read tensor {key!r} ({err}); truncated file?") from err

    def _file_bytes(self, file: Path) -> torch.Tensor:
        """The whole file as a uint8 tensor over a private (copy-on-write) memory map, made once per file: a tensor
        in the file's dtype is a view of it (3-4x faster than safetensors' `get_tensor`, which builds a storage
        slice per tensor: 0.026 s of a 0.08 s UNet load). Writing to such a tensor copies the page, never the file."""
        data = self._private.get(file)
        if data is None:
            with open(file, "rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            data = self._private[file] = torch.frombuffer(mapped, dtype=torch.uint8)
        return data

    def _read_converted(self, file: Path, stored: torch.dtype, start: int, end: int, out: torch.Tensor) -> None:
        """Bytes [start, end) of `file` (elements of `stored`) into the flat tensor `out`, converting piecewise.

        Each piece of READ_BUFFER_BYTES is converted straight from a read-only memory map of the file (the page
        cache, no intermediate copy), and its pages are then dropped from this process's mapping
        (MADV_DONTNEED: the page cache keeps them), so no more than one piece of the file is ever resident here."""
        if end - start != out.numel() * stored.itemsize:
            raise CheckpointError(f"{file}: a tensor's byte range {start}..{end} does not match its shape")
        if end > file.stat().st_size:
            raise CheckpointError(f"{file}: file ends inside a tensor; truncated file?")
        mapped = self._maps.get(file)
        if mapped is None:
            with open(file, "rb") as fh:
                mapped = self._maps[file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        step = max(1, READ_BUFFER_BYTES // stored.itemsize)
        with warnings.catch_warnings():  # read only, never written: torch warns about any non-writable buffer
            warnings.simplefilter("ignore", UserWarning)
            for i in range(0, out.numel(), step):
                n = min(step, out.numel() - i)
                offset = start + i * stored.itemsize
                out[i:i + n].copy_(torch.frombuffer(mapped, dtype=stored, count=n, offset=offset))
                if hasattr(mapped, "madvise"):  # POSIX; elsewhere the pages stay mapped until the map closes
                    first = offset - offset % mmap.PAGESIZE
                    mapped.madvise(mmap.MADV_DONTNEED, first, offset + n * stored.itemsize - first)

    def release_buffer(self) -> None:
        """Unmap the files' read-only maps used for converted reads (the next converted read maps them again)."""
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()


def _layout(header: dict, base: int) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """{key: (dtype name, shape, first byte, end byte)} from a checked safetensors header (`read_header`) whose
    data starts at byte `base`."""
    return {k: (v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def diffusers_unet_files(folder: Path) -> list[Path] | None:
    unet = folder / "unet" if (folder / "unet").is_dir() else folder
    for name in DIFFUSERS_UNET_FILES:
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


def open_unet_source(source) -> tuple[TensorSource, str]:
    """Open a UNet checkpoint and detect its format: returns (source, 'original' | 'diffusers' | 'svdlite')."""
    path = Path(source)
    if path.is_dir():
        files = diffusers_unet_files(path)
        if files is None:
            raise CheckpointError(f"{path} is a folder without a diffusers UNet (expected "
                                  f"unet/{DIFFUSERS_UNET_FILES[0]} or .fp16 variant, or a sharded index)")
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


def original_source_names(fmt: str, config: UNetConfig, svdlite_keys) -> dict[str, str]:
    """{original sgm key (unprefixed): key in the file} for every original tensor of this network."""
    keys = original_unet_keys(svdlite_keys)
    if fmt == "original":
        return {k: ORIGINAL_PREFIX + k for k in keys}
    if fmt == "diffusers":
        return diffusers_unet_names(config, keys)
    raise AssertionError(fmt)


def unet_read_plan(fmt: str, expected: dict[str, tuple], names: dict[str, str] | None) -> dict[str, tuple[str, ...]]:
    """{svdlite key: file keys it is computed from}; folded tensors come from two attn2 tensors.
    names: `original_source_names(fmt, config, expected)` (None for an svdlite file)."""
    if fmt == SVDLITE_FORMAT:
        return {k: (SVDLITE_UNET_PREFIX + k,) for k in expected}
    return {k: tuple(names[s] for s in fold_sources(k)) for k in expected}


def expected_unet_source_keys(fmt: str, config: UNetConfig = UNetConfig()) -> set[str]:
    """Every key the loader reads from a file of this format (excludes the never-read attn2 to_q / to_k)."""
    with torch.device("meta"):
        shapes = state_shapes(VideoUNet(config))
    return {s for entry in unet_plan(fmt, config, shapes)[0].values() for s in entry.sources}


def unet_file_keys(fmt: str, keys: set[str]) -> set[str]:
    if fmt == "original":
        return {k for k in keys if k.startswith(ORIGINAL_PREFIX)}
    if fmt == SVDLITE_FORMAT:
        return {k for k in keys if k.startswith(SVDLITE_UNET_PREFIX)}
    return keys


def _fmt_keys(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def fold_matmul(w_out: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """attn2's W_out (C, C') @ W_v (C', D), in the dtype given (the loader passes float32, or float64 for a
    float64 model): float32 differs from the float64 product by ~1e-6 relative (tests/test_loading.py)."""
    return w_out @ w_v


def fold_shape(out_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of `fold_matmul`'s product; a RuntimeError (reported as a wrong shape) if it is undefined."""
    if len(out_shape) != 2 or len(v_shape) != 2 or out_shape[1] != v_shape[0]:
        raise RuntimeError(f"cannot multiply {out_shape} by {v_shape}")
    return out_shape[0], v_shape[1]


@dataclass(frozen=True)
class Entry:
    """How one model tensor is made: the file tensors it is read from, and how they combine (None: a copy)."""

    sources: tuple[str, ...]
    combine: Callable | None = None
    shape: Callable | None = None  # the combined shape from the sources' shapes (default: combine on meta tensors)


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{state_dict key: shape} of a model, in state_dict order: its parameters and persistent buffers, read in one
    walk over the modules (`state_dict()` itself calls hooks and builds a detached tensor per entry)."""
    shapes = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        shapes.update((prefix + k, tuple(p.shape)) for k, p in module._parameters.items() if p is not None)
        shapes.update((prefix + k, tuple(b.shape)) for k, b in module._buffers.items()
                      if b is not None and k not in module._non_persistent_buffers_set)
    return shapes


def load_planned(model: nn.Module, src: TensorSource, plan: dict[str, Entry], *, scope: set[str],
                 ignored: set[str] = frozenset(), dtype: torch.dtype, device, label: str,
                 shapes: dict[str, tuple[int, ...]], on_read: Callable[[int], None] | None = None) -> nn.Module:
    """Strictly load `model` (built on the meta device) from `src` following `plan`, in eval mode, no gradients.

    scope: the file's keys that belong to this component; any not in the plan and not deliberately `ignored`
    is unexpected. All problems are collected and raised as one CheckpointError naming the keys.
    shapes: `state_shapes(model)`, which the caller has already made its plan from.
    on_read: called with the file bytes read so far since its last call, every PROGRESS_BYTES or so and once at
    the end (a progress bar's update).
    """
    expected = shapes
    if set(plan) != set(expected):
        raise AssertionError(f"{label}: read plan and model disagree: {_fmt_keys(set(plan) ^ set(expected))}")
    needed = {s for e in plan.values() for s in e.sources}
    missing, unexpected = needed - src.keys(), scope - needed - set(ignored)
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {_fmt_keys(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected: {_fmt_keys(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{label} does not match the expected network: " + "; ".join(parts))
    wrong = []
    for key, entry in plan.items():
        shapes = [src.shape(s) for s in entry.sources]
        try:
            if entry.combine is None:
                shape = shapes[0]
            elif entry.shape is not None:
                shape = tuple(entry.shape(*shapes))
            else:
                shape = tuple(entry.combine(*(torch.empty(s, device="meta") for s in shapes)).shape)
        except RuntimeError:
            shape = tuple(shapes)
        if shape != expected[key]:
            wrong.append(f"{entry.sources[0]}: file {shape if entry.combine is None else tuple(shapes)}, "
                         f"expected {expected[key]}")
    if wrong:
        raise CheckpointError(f"{len(wrong)} tensors of {label} have the wrong shape: " + "; ".join(wrong[:8])
                              + (f" ... (+{len(wrong) - 8} more)" if len(wrong) > 8 else ""))
    not_float = sorted(f"{s} ({src.dtype(s)})" for s in needed if src.dtype(s) not in FLOAT_DTYPES)
    if not_float:
        raise CheckpointError(f"{len(not_float)} tensors of {label} are not floating point, expected F32, F16 or "
                              f"BF16: {_fmt_keys(not_float)}")
    state, work = {}, torch.promote_types(dtype, torch.float32)  # combined tensors: computed in >= float32
    pending = 0
    for key, entry in plan.items():
        if entry.combine is None:
            state[key] = src.get(entry.sources[0], dtype, device)
        else:
            state[key] = entry.combine(*(src.get(s, work, device) for s in entry.sources)).to(dtype)
        if on_read is not None:
            pending += sum(src.nbytes(s) for s in entry.sources)
            if pending >= PROGRESS_BYTES:
                on_read(pending)
                pending = 0
    if on_read is not None and pending:
        on_read(pending)
    src.release_buffer()
    left = assign_state(model, state)
    if left:
        raise CheckpointError(f"{label}: tensors left unloaded: {_fmt_keys(left)}")
    return model


def assign_state(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Make each tensor of `state` the model's parameter (requires_grad=False) or buffer of that name, as
    `load_state_dict(state, strict=True, assign=True)` does once keys and shapes are checked (`load_planned` checks
    them first), and put every module in eval mode, in one pass over the modules and one over the keys (torch's
    walks of every module with every key, then `eval()` and `requires_grad_()`, cost 0.04-0.08 s of a 0.15 s UNet
    load). Returns the names of the parameters and buffers still on the meta device (none if `state` is complete)."""
    modules = dict(model.named_modules())
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        module = modules[owner]
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        elif leaf in module._buffers and leaf not in module._non_persistent_buffers_set:
            module._buffers[leaf] = value
        else:
            raise AssertionError(f"{key} is neither a parameter nor a saved buffer of the model")
    left = []
    for name, module in modules.items():
        module.training = False
        left += [f"{name}.{k}".lstrip(".") for k, t in (*module._parameters.items(), *module._buffers.items())
                 if t is not None and t.is_meta]
    return left


def unet_plan(fmt: str, config: UNetConfig, expected) -> tuple[dict[str, Entry], set[str]]:
    """The UNet's read plan for a file of this format, and the file keys it deliberately leaves unread (every
    original tensor of the network; those it does not read are attn2's to_q/to_k)."""
    names = None if fmt == SVDLITE_FORMAT else original_source_names(fmt, config, expected)
    fold = Entry((), fold_matmul, fold_shape)
    plan = {k: Entry(srcs, fold.combine, fold.shape) if len(srcs) == 2 else Entry(srcs)
            for k, srcs in unet_read_plan(fmt, expected, names).items()}
    return plan, set() if names is None else set(names.values())


# svdlite files written by earlier converters say so in their metadata: their VideoResBlocks'
# `time_stack.out_layers.3` tensors hold (1 - alpha) W and b, the blend folded in; the model then scales by 1.0
BLEND_METADATA_KEY, BLEND_FOLDED = "unet_temporal_blend", "folded"


def blend_is_stored_folded(src: TensorSource) -> bool:
    """Whether this file's VideoResBlocks' temporal convs are stored with the blend folded in (older svdlite files)."""
    return src.metadata.get(BLEND_METADATA_KEY) == BLEND_FOLDED


def mark_stored_blend(unet: VideoUNet, src: TensorSource) -> VideoUNet:
    """Mark each VideoResBlock of `unet`, loaded from `src`, as holding the blend folded in if the file says so
    (`VideoResBlock.branch_scale` is then 1 for video frames); other files' tensors are used as they are."""
    from .unet_blocks import VideoResBlock

    if blend_is_stored_folded(src):
        for block in unet.modules():
            if isinstance(block, VideoResBlock):
                block.blend_folded = True
    return unet


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector paused while a model is built and loaded (and restored as it was): building
    the UNet leaves ~27k tracked objects, whose allocation sets off collections that each walk every live object,
    more so beside an already loaded model (docs/SPEED.md). Reference counting frees the tensors as ever; only cycles
    wait. Meant for svdlite's own module building: an import inside it (open_clip's, say) would leave its cycles, and
    their finalizers, to a collection in the middle of sampling."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _stored_config(src: TensorSource, fmt: str) -> UNetConfig:
    """The network a file declares: svdlite metadata, a diffusers config.json beside the weights, else SVD's."""
    if fmt == SVDLITE_FORMAT and "unet_config" in src.metadata:
        return UNetConfig.from_dict(json.loads(src.metadata["unet_config"]))
    config_json = src.files[0].parent / "config.json"
    if fmt == "diffusers" and config_json.is_file():
        return unet_config_from_diffusers(json.loads(config_json.read_text()))
    return UNetConfig()


def load_unet(source, config: UNetConfig | None = None, *, device="cpu", dtype: torch.dtype = torch.float32,
              fold_cross_attention: bool | str = True, return_source: bool = False):
    """Build `VideoUNet` on the meta device and load it strictly from `source` (file or folder, format detected).

    config: the network; by default the one the checkpoint declares (svdlite metadata, diffusers config.json),
    else SVD's (`UNetConfig()`).
    Cross-attention is folded (unet_blocks.py): an svdlite file holds the product, original and diffusers files load
    attn2 `to_v`/`to_out` as they are (no product at load); attn2 `to_q`/`to_k` are never read.
    fold_cross_attention=False (ablation only) loads the original attn2 weights and computes them at every call;
    "temporal" folds only the temporal blocks' (the VCUT paper's variant).
    """
    with gc_paused():
        return _load_unet(source, config, device=device, dtype=dtype, fold_cross_attention=fold_cross_attention,
                          return_source=return_source)


def _load_unet(source, config, *, device, dtype, fold_cross_attention, return_source):
    src, fmt = open_unet_source(source)
    if config is None:
        config = _stored_config(src, fmt)
    if fold_cross_attention is not True and fmt == SVDLITE_FORMAT:
        raise CheckpointError(f"{src.files[0]} is an svdlite file, which holds only the folded cross-attention; the "
                              "unfolded ablation needs an original or diffusers checkpoint")
    with torch.device("meta"):
        model = VideoUNet(config, fold_cross_attention=fold_cross_attention, fold_product=fmt == SVDLITE_FORMAT)
    shapes = state_shapes(model)
    plan, ignored = unet_plan(fmt, config, shapes)
    label = (f"{fmt}-format UNet ({src.files[0].name}) for UNetConfig(model_channels={config.model_channels}, "
             f"channel_mult={config.channel_mult}, context_dim={config.context_dim})")
    load_planned(model, src, plan, scope=unet_file_keys(fmt, src.keys()), ignored=ignored, dtype=dtype,
                 device=device, label=label, shapes=shapes)
    mark_stored_blend(model, src)
    return (model, src) if return_source else model
