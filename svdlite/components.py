"""The whole model: finding its four components in a checkpoint, loading them strictly, describing a file.

Components and their svdlite names: `unet` (VideoUNet), `vae_encoder` (encoder + quant_conv, the conditioning
path), `vae_decoder` (temporal VideoDecoder), `image_encoder` (OpenCLIP ViT-H/14 visual tower). Each is read
from an original single file, a diffusers pipeline folder or an svdlite file through a read plan (loading.py).
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import clip_keymap, vae_keymap
from .clip import CLIPVisionConfig, build_image_encoder
from .loading import (SAFETENSORS_DTYPES, SVDLITE_FORMAT, CheckpointError, Entry, TensorSource, detect_unet_format,
                      diffusers_unet_files, gc_paused, load_planned, mark_stored_blend, state_shapes, unet_file_keys,
                      unet_plan)
from .checks import resolve_device, resolve_dtype
from .presets import PRESETS
from .unet import UNetConfig, VideoUNet
from .unet_keymap import ORIGINAL_PREFIX, unet_config_from_diffusers, unet_config_from_shapes
from .vae import ConditionEncoder, FrameDecoder, VAEConfig, VideoDecoder

COMPONENTS = ("unet", "vae_encoder", "vae_decoder", "image_encoder")
SVDLITE_PREFIXES = {c: c + "." for c in COMPONENTS}  # svdlite file: `<component>.<module key>`
DIFFUSERS_FILES = {"vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
                   "image_encoder": ("model.safetensors", "model.fp16.safetensors")}


@dataclass
class SVDModel:
    """Loaded components plus the preset whose sampling defaults apply."""

    unet: VideoUNet
    vae_encoder: ConditionEncoder
    vae_decoder: VideoDecoder | FrameDecoder  # FrameDecoder: an *_image_decoder checkpoint, no temporal layers
    image_encoder: nn.Module
    vae_config: VAEConfig
    clip_config: CLIPVisionConfig
    preset: str
    source: str

    @property
    def sampling(self):
        return PRESETS[self.preset].sampling


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


def _first_file(folder: Path, names) -> list[Path] | None:
    for name in names:
        if (folder / name).is_file():
            return [folder / name]
    return None


def _preset_from_name(path: Path, default: str = "svd-xt") -> str:
    name = path.name.lower().replace("-", "_")
    for key, preset in (("xt_1_1", "svd-xt-1.1"), ("svd_xt", "svd-xt"), ("img2vid_xt", "svd-xt"), ("svd", "svd"),
                        ("img2vid", "svd")):
        if key in name:
            return preset
    return default


def open_model_source(path, preset: str | None = None, *, require_all: bool = True) -> ModelSource:
    """Find the components in a file or folder. require_all=False (the converter) accepts a source without
    some of them; the missing ones are then absent from `files`."""
    path = Path(path)
    if path.is_dir():
        unet_files = diffusers_unet_files(path)
        parts = {"unet": unet_files, "vae": _first_file(path / "vae", DIFFUSERS_FILES["vae"]),
                 "image_encoder": _first_file(path / "image_encoder", DIFFUSERS_FILES["image_encoder"])}
        absent = [f"{k}/" for k, v in parts.items() if v is None]
        if parts["unet"] is None or (absent and require_all):
            pickles = sorted(str(f.relative_to(path)) for k in absent for f in (path / k).glob("*.bin"))
            raise CheckpointError(f"{path} is not a complete diffusers SVD folder: no weights in {', '.join(absent)}"
                                  + (f" ({', '.join(pickles)} are pickle files, which svdlite never loads; use the "
                                     ".safetensors files of the same repository)" if pickles else ""))
        files = {"unet": TensorSource(parts["unet"])}
        if parts["vae"]:
            files["vae_encoder"] = files["vae_decoder"] = TensorSource(parts["vae"])
        if parts["image_encoder"]:
            files["image_encoder"] = TensorSource(parts["image_encoder"])
        detect_unet_format(files["unet"], path)
        unet_json = parts["unet"][0].parent / "config.json"
        unet_params = json.loads(unet_json.read_text()) if unet_json.is_file() else {}
        vae_json, clip_json = path / "vae" / "config.json", path / "image_encoder" / "config.json"
        vae_config = vae_config_from_diffusers(json.loads(vae_json.read_text())) if vae_json.is_file() else VAEConfig()
        clip_config = (CLIPVisionConfig.from_transformers(json.loads(clip_json.read_text())) if clip_json.is_file()
                       else CLIPVisionConfig())
        guess = "svd" if unet_params.get("num_frames") == 14 else _preset_from_name(path)
        return ModelSource("diffusers", files, unet_config_from_diffusers(unet_params) if unet_params else UNetConfig(),
                           vae_config, clip_config, preset or guess, path)
    src = TensorSource([path]) if path.is_file() else None
    if src is None:
        raise CheckpointError(f"{path}: no such file or folder")
    fmt = detect_unet_format(src, path)
    files = {c: src for c in COMPONENTS}
    if fmt == SVDLITE_FORMAT:
        meta = src.metadata
        present = meta.get("components", "").split(",")
        missing = [c for c in COMPONENTS if c not in present]
        if missing and require_all:
            raise CheckpointError(f"{path} is an svdlite file without {', '.join(missing)} (it holds {present}); "
                                  "generation needs all four components")
        return ModelSource(fmt, files, UNetConfig.from_dict(json.loads(meta["unet_config"])),
                           VAEConfig.from_dict(json.loads(meta["vae_config"])),
                           CLIPVisionConfig(**json.loads(meta["clip_config"])), preset or meta.get("preset", "svd-xt"),
                           path, frame_decoder=meta.get("vae_decoder") == "frame")
    keys = src.keys()
    decoder_keys = [k for k in keys if k.startswith(vae_keymap.DECODER_PREFIX)]
    # *_image_decoder variants: a decoder without temporal layers, decoded frame by frame (vae.FrameDecoder)
    frame_decoder = bool(decoder_keys) and not any(".time_stack." in k or "time_mix_conv" in k for k in decoder_keys)
    needed = (("VAE decoder", vae_keymap.DECODER_PREFIX), ("VAE encoder", vae_keymap.ENCODER_PREFIX),
              ("CLIP image encoder", clip_keymap.ORIGINAL_PREFIX))
    for what, prefix in needed if require_all else ():
        if not any(k.startswith(prefix) for k in keys):
            raise CheckpointError(f"{path}: this original-format file has no {what} ({prefix}*)")
    return ModelSource(fmt, files, _original_unet_config(src, path), _original_vae_config(src),
                       _original_clip_config(src), preset or _preset_from_name(path), path, frame_decoder=frame_decoder)


def _original_unet_config(src: TensorSource, path: Path) -> UNetConfig:
    """Read from the file's shapes; for every released SVD file this is UNetConfig()."""
    p = ORIGINAL_PREFIX
    try:
        return unet_config_from_shapes(lambda k: src.shape(p + k), lambda k: p + k in src.key_file)
    except (KeyError, ValueError, ZeroDivisionError, IndexError) as err:
        raise CheckpointError(f"{path}: cannot read the UNet's configuration from its shapes ({err!r})") from err


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


def _with_prefix(keys, prefix: str) -> set[str]:
    return {k for k in keys if k.startswith(prefix)}


def component_scope(ms: ModelSource, component: str) -> set[str]:
    """The file keys that belong to a component (those it reads, and those of it deliberately left unread)."""
    keys, fmt = ms.files[component].keys(), ms.fmt
    if fmt == SVDLITE_FORMAT:
        return _with_prefix(keys, SVDLITE_PREFIXES[component])
    if component == "unet":
        return unet_file_keys(fmt, keys)
    if component == "vae_encoder":
        if fmt == "original":
            return _with_prefix(keys, vae_keymap.ENCODER_PREFIX) | _with_prefix(keys, vae_keymap.QUANT_CONV_PREFIX)
        return _with_prefix(keys, "encoder.") | _with_prefix(keys, "quant_conv.")
    if component == "vae_decoder":
        if fmt == "original" and ms.frame_decoder:  # `decoder.*` and `post_quant_conv.*` under first_stage_model.
            return (_with_prefix(keys, vae_keymap.DECODER_PREFIX)
                    | _with_prefix(keys, vae_keymap.FRAME_DECODER_PREFIX + "post_quant_conv."))
        return _with_prefix(keys, vae_keymap.DECODER_PREFIX if fmt == "original" else "decoder.")
    if component == "image_encoder":
        return _with_prefix(keys, clip_keymap.ORIGINAL_PREFIX) if fmt == "original" else set(keys)
    raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")


def component_plan(ms: ModelSource, component: str, ours: dict[str, tuple[int, ...]]) -> tuple[dict, set, set]:
    """(read plan, the file keys that belong to this component, keys deliberately not read) for the component's
    module whose `loading.state_shapes` are `ours`."""
    scope, fmt = component_scope(ms, component), ms.fmt
    if fmt == SVDLITE_FORMAT:
        prefix = SVDLITE_PREFIXES[component]
        return {k: Entry((prefix + k,)) for k in ours}, scope, set()
    if component == "unet":
        plan, ignored = unet_plan(fmt, ms.unet_config, ours)
        return plan, scope, ignored
    if component == "vae_encoder":
        if fmt == "original":
            names = {k: (vae_keymap.ENCODER_PREFIX + k[len("encoder."):] if k.startswith("encoder.")
                         else vae_keymap.QUANT_CONV_PREFIX + k[len("quant_conv."):]) for k in ours}
            return {k: Entry((v,)) for k, v in names.items()}, scope, set()
        table = vae_keymap.encoder_key_map(ms.vae_config)
        plan = {k: Entry(("encoder." + table[k[len("encoder."):]] if k.startswith("encoder.") else k,),
                         _reshape(k[len("encoder."):])) for k in ours}
        return plan, scope, set()
    if component == "vae_decoder":
        if fmt == "original":
            prefix = vae_keymap.FRAME_DECODER_PREFIX if ms.frame_decoder else vae_keymap.DECODER_PREFIX
            return {k: Entry((prefix + k,)) for k in ours}, scope, set()
        table = vae_keymap.decoder_key_map(ms.vae_config)
        return {k: Entry(("decoder." + table[k],), _reshape(k)) for k in ours}, scope, set()
    # image_encoder
    if fmt == "original":
        return {k: Entry((clip_keymap.ORIGINAL_PREFIX + k,)) for k in ours}, scope, set()
    plan = {ours_key: Entry(theirs, None if kind == "copy" else clip_keymap.combiner(kind))
            for ours_key, theirs, kind in clip_keymap.key_table(ms.clip_config)}
    return plan, scope, set(clip_keymap.IGNORED_TRANSFORMERS_KEYS)


def component_bytes(ms: ModelSource, component: str) -> int:
    """The size of a component's tensors in its file (`component_scope`), read from the header."""
    src = ms.files[component]
    return sum(src.nbytes(k) for k in component_scope(ms, component))


def _reshape(key: str):
    """diffusers' mid-attention Linear (C, C) -> the original 1x1 conv (C, C, 1, 1); None elsewhere."""
    if vae_keymap.to_original_shape(key, torch.empty(1, 1, device="meta")).ndim == 4:
        return lambda t: vae_keymap.to_original_shape(key, t)
    return None


def build_component(component: str, ms: ModelSource, fold_cross_attention: bool = True,
                    fold_product: bool | None = None) -> nn.Module:
    """The empty (meta device) module of a component, for the checkpoint's configs. fold_product (UNet): whether
    the folded cross-attention holds the product; by default as the source stores it (only svdlite files do)."""
    if fold_product is None:
        fold_product = ms.fmt == SVDLITE_FORMAT
    with torch.device("meta"):
        if component == "unet":
            return VideoUNet(ms.unet_config, fold_cross_attention=fold_cross_attention, fold_product=fold_product)
        if component == "vae_encoder":
            return ConditionEncoder(ms.vae_config)
        if component == "vae_decoder":
            return FrameDecoder(ms.vae_config) if ms.frame_decoder else VideoDecoder(ms.vae_config)
        return build_image_encoder(ms.clip_config)


def load_component(ms: ModelSource, component: str, *, device="cpu", dtype=torch.float32,
                   on_read: Callable[[int], None] | None = None) -> nn.Module:
    """One component, loaded strictly; on_read(bytes) reports the reading in steps (`loading.load_planned`)."""
    if component == "unet":  # its ~27k objects built with the collector paused (loading.gc_paused)
        with gc_paused():
            return _load_component(ms, component, device=device, dtype=dtype, on_read=on_read)
    return _load_component(ms, component, device=device, dtype=dtype, on_read=on_read)


def _load_component(ms: ModelSource, component: str, *, device, dtype, on_read) -> nn.Module:
    model = build_component(component, ms)
    shapes = state_shapes(model)
    plan, scope, ignored = component_plan(ms, component, shapes)
    label = f"{ms.fmt}-format {component} ({ms.path})"
    model = load_planned(model, ms.files[component], plan, scope=scope, ignored=ignored, dtype=dtype, device=device,
                         label=label, shapes=shapes, on_read=on_read)
    if component == "unet":
        return mark_stored_blend(model, ms.files["unet"])
    return model


def resolve_model_path(model, token: str | None = None) -> tuple[Path, str | None]:
    """A model argument (preset name or path) -> (local path, preset name if one was named)."""
    if isinstance(model, str) and model in PRESETS:
        if model == "tiny":
            return Path(__file__).parent / "assets" / "tiny.safetensors", "tiny"
        from .hub import download_preset
        return download_preset(model, token=token), model
    path = Path(model)
    if not path.exists():
        raise CheckpointError(f"model {model!r}: no such file or folder, and not a preset ({', '.join(PRESETS)})")
    return path, None


def load_model(model="svd-xt", *, device="auto", dtype="auto", token: str | None = None,
               progress: bool = False) -> SVDModel:
    """Load all four components from a preset name, an original file, a diffusers folder or an svdlite file.

    Args:
        model: a preset name (`svd`, `svd-xt`, `svd-xt-1.1`: downloaded once from Hugging Face; `tiny`: the
            bundled random model), or the path of an original `.safetensors` file, a diffusers folder or an
            svdlite file.
        device: "auto" (the default: the first CUDA GPU when torch sees one, else the CPU; `checks.resolve_device`),
            or a device: "cpu", "cuda", "cuda:N", "mps" or a torch.device.
        dtype: the UNet's and CLIP's dtype: "auto" (the default: float16 on a CUDA or MPS GPU, what SVD is run in
            there, and float32 on the CPU, where half precision is slower and less exact; `checks.resolve_dtype`),
            or torch.float32, torch.float16 or torch.bfloat16. The VAE runs in float32 whatever `dtype` is (as sgm
            disables autocast for encoding and decoding).
        token: a Hugging Face token, for a gated preset (default: the `HF_TOKEN` environment variable or the
            huggingface-cli login).
        progress: show a progress bar on stderr (tqdm: "loading", the bytes of the components' tensors read, the
            time left). It moves every few tensors, costing the loading nothing measurable.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path, preset = resolve_model_path(model, token)
    ms = open_model_source(path, preset)
    dtypes = {"unet": dtype, "vae_encoder": torch.float32, "vae_decoder": torch.float32, "image_encoder": dtype}
    sizes = {component: component_bytes(ms, component) for component in dtypes} if progress else {}
    parts = {}
    with tqdm(total=sum(sizes.values()), desc="loading", unit="B", unit_scale=True, disable=not progress) as bar:
        for component, component_dtype in dtypes.items():
            before = bar.n
            parts[component] = load_component(ms, component, device=device, dtype=component_dtype,
                                               on_read=bar.update if progress else None)
            if progress:  # the tensors of the component's scope left unread (attn2's to_q and to_k in the UNet)
                bar.update(max(0, before + sizes[component] - bar.n))
    return SVDModel(**parts, vae_config=ms.vae_config, clip_config=ms.clip_config, preset=ms.preset,
                    source=str(path))


FORMAT_NAMES = {"original": "original (Stability AI's single file, as sgm writes it)",
                "diffusers": "diffusers (a pipeline folder, or its unet/ alone)",
                SVDLITE_FORMAT: "svdlite (svdlite's own file, as tools/convert_weights.py writes it)"}


def describe_sampling(s) -> str:
    """A preset's sampling defaults (`presets.SamplingConfig`) as a person reads them; sizes width x height."""
    return (f"{s.num_frames} frames, {s.num_inference_steps} steps, guidance {float(s.min_guidance_scale)} -> "
            f"{float(s.max_guidance_scale)}, {s.width}x{s.height} (width x height), {s.fps} fps, motion bucket "
            f"{s.motion_bucket_id}, noise augmentation {s.noise_aug_strength}, decode chunk {s.decode_chunk_size}")


def _metadata_lines(meta: dict[str, str]) -> list[str]:
    """What an svdlite file's metadata says of where it comes from; a field left empty is "(not recorded)"."""
    def value(key):
        return meta.get(key) or "(not recorded)"

    return [f"converted by: svdlite {value('svdlite_version')}, file format version {value('format_version')}",
            f"stored dtype: {value('dtype')}", f"converted from: {value('source')}",
            f"source sha256: {value('source_sha256')}"]


def _stored_dtypes(src: TensorSource, keys) -> str:
    """"float16", or "1300 float16, 28 float32" for a mixed set of tensors."""
    counts: dict[str, int] = {}
    for k in keys:
        name = src.dtype(k)
        counts[name] = counts.get(name, 0) + 1
    names = {n: str(SAFETENSORS_DTYPES[n]).removeprefix("torch.") if n in SAFETENSORS_DTYPES else n for n in counts}
    if len(counts) == 1:
        return names[next(iter(counts))]
    return ", ".join(f"{c} {names[n]}" for n, c in sorted(counts.items(), key=lambda item: -item[1]))


def describe(model) -> list[str]:
    """Lines for `svdlite info`: format, preset, each component's tensors and parameters (nothing is loaded).

    A downloadable preset's name is described from its definition, without downloading it."""
    if isinstance(model, str) and model in PRESETS and PRESETS[model].repo_id:
        from .hub import COMPONENT_FILES
        p = PRESETS[model]
        files = ", ".join(f"{folder}/{names[0]}" for folder, names, _ in COMPONENT_FILES)
        gated = ", gated: accept its license there, then set HF_TOKEN" if p.gated else ""
        return [f"preset: {p.name} (Hugging Face {p.repo_id}{gated})",
                f"downloads: {files} (+ config.json each; fp32 files where no fp16 variant exists)",
                f"original single file: {p.single_file}", f"sampling defaults: {describe_sampling(p.sampling)}",
                "run `svdlite info PATH` on a downloaded or local checkpoint for its tensors and parameters"]
    path, preset = resolve_model_path(model)
    ms = open_model_source(path, preset, require_all=False)
    lines = [f"checkpoint: {path}", f"format: {FORMAT_NAMES[ms.fmt]}", f"preset: {ms.preset}",
             f"sampling defaults: {describe_sampling(PRESETS[ms.preset].sampling)}"]
    if ms.frame_decoder:
        lines.append("VAE decoder: the *_image_decoder variant's 2-D decoder, run on each frame alone (no temporal "
                     "layers: frames are decoded without temporal smoothing)")
    if ms.fmt == SVDLITE_FORMAT:
        lines += _metadata_lines(ms.files["unet"].metadata)
    total_file, total_loaded, incomplete = 0, 0, []
    for component in COMPONENTS:
        if component not in ms.files:
            lines.append(f"{component}: absent")
            incomplete.append(component)
            continue
        shapes = state_shapes(build_component(component, ms))
        plan, scope, _ = component_plan(ms, component, shapes)
        src = ms.files[component]
        needed = {s for e in plan.values() for s in e.sources}
        if needed - src.keys():
            lines.append(f"{component}: {len(needed - src.keys())} of the {len(needed)} tensors svdlite reads are "
                         f"absent (e.g. {sorted(needed - src.keys())[0]})")
            incomplete.append(component)
            continue
        in_file = sum(torch.Size(src.shape(k)).numel() for k in scope)
        loaded = sum(torch.Size(shape).numel() for shape in shapes.values())
        total_file, total_loaded = total_file + in_file, total_loaded + loaded
        lines.append(f"{component}: {len(scope)} tensors ({_stored_dtypes(src, scope)}), {in_file:,} parameters "
                     f"in the file; svdlite loads {loaded:,} from {len(needed)} tensors")
    lines.append(f"total: {total_file:,} parameters in the components' tensors; {total_loaded:,} loaded")
    lines.append(f"complete: no, {', '.join(incomplete)} missing; generation needs all four components" if incomplete
                 else "complete: yes, every tensor generation reads is there (shapes are checked when loading)")
    return lines
