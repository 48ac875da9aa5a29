"""Writing svdlite's own checkpoint format (tools/convert_weights.py is the command around it).

An svdlite file is one safetensors file: keys `<component>.<module key>` for the components present (`unet`,
`vae_encoder`, `vae_decoder`, `image_encoder`), the cross-attention stored only as the folded `attn2_fold`
projections (computed in float32 and rounded once to the file's dtype, so loading changes no tensor and a file in
the model's dtype is used in place), and metadata: format, format_version, components, preset, the configs, source
sha256, svdlite version. Every tensor whose size is a multiple of 64 bytes starts at a 64-byte boundary of the file
(the rest follow them), so loading in the stored dtype uses the memory map in place (loading.ALIGNMENT). Writing
goes to a temporary file beside the target, which is reloaded and checked tensor by tensor before it is renamed
into place; on any failure nothing is left behind and an existing file is untouched.
"""
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint_file import CheckpointError
from .formats import (BLEND_FOLDED, BLEND_METADATA_KEY, COMPONENTS, SVDLITE_FORMAT, SVDLITE_PREFIXES, ModelSource,
                      blend_is_stored_folded)
from .loading import load_component
from .presets import PRESETS
from .read_plans import present_components
from .tensor_source import TensorSource, save_aligned
from .unet_keymap import NEVER_READ_SUFFIXES
from .version import __version__

FORMAT_VERSION = "1"

# What an original single file holds that svdlite never uses, with the reason (README "Converted checkpoints")
DROPPED = (
    (NEVER_READ_SUFFIXES, "cross-attention to_q/to_k (no effect: softmax over one CLIP token is 1)"),
    (("attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias"),
     "cross-attention to_v/to_out, stored folded"),
    (("first_stage_model.encoder.", "first_stage_model.quant_conv."),
     "first_stage_model encoder (SVD encodes with the conditioner's copy)"),
    (("conditioner.embedders.3.encoder.decoder.", "conditioner.embedders.3.encoder.post_quant_conv."),
     "the conditioner's 2-D image decoder (never run)"),
    (("conditioner.embedders.0.open_clip.model.",), "OpenCLIP text-side leftovers"),
)


def dropped_reason(key: str) -> str:
    for patterns, reason in DROPPED:
        if any(key.endswith(p) if p.startswith("attn2.") else key.startswith(p) for p in patterns):
            return reason
    return "not part of any component"


def sha256_of(paths, progress: bool = False) -> str:
    digest = hashlib.sha256()
    paths = sorted(Path(p) for p in paths)
    with tqdm(total=sum(p.stat().st_size for p in paths), desc="hashing the source", unit="B", unit_scale=True,
              disable=not progress) as bar:
        for path in paths:
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    bar.update(len(block))
    return digest.hexdigest()


def config_metadata(ms: ModelSource, components) -> dict[str, str]:
    return {"unet_config": json.dumps(ms.unet_config.to_dict()),
            "vae_config": json.dumps(dataclasses.asdict(ms.vae_config)),
            "clip_config": json.dumps(dataclasses.asdict(ms.clip_config)),
            "components": ",".join(components),
            **({"vae_decoder": "frame"} if ms.frame_decoder else {})}


def write_svdlite(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
                  force: bool = False) -> None:
    """Atomically write an svdlite file: temp file in the target folder, reload and compare, then rename."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force (force=True) to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        save_aligned(tensors, tmp, {"format": SVDLITE_FORMAT, "format_version": FORMAT_VERSION, **metadata})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # temporary files are created 0600; give the result the usual permissions
        check = TensorSource([tmp])
        if check.keys() != set(tensors):
            raise CheckpointError(f"reloading {tmp} gave different keys: {sorted(check.keys() ^ set(tensors))[:5]}")
        for key, value in tensors.items():
            if not torch.equal(check.get(key), value):
                raise CheckpointError(f"reloading {tmp}: tensor {key} differs from what was written")
        del check  # release the file before it is renamed
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def convert(ms: ModelSource, out: Path, *, dtype: torch.dtype = torch.float16, force: bool = False,
            log=print, progress: bool = False) -> dict:
    """Convert the components `ms` holds into an svdlite file at `out`; returns a summary dict.

    progress: bars (stderr) over the components and the source hash."""
    if ms.preset not in PRESETS:
        raise ValueError(f"unknown preset {ms.preset!r}; expected one of {sorted(PRESETS)}")
    components = present_components(ms)
    if "unet" not in components:
        raise CheckpointError(f"{ms.path} holds no SVD UNet; nothing to convert")
    absent = [c for c in COMPONENTS if c not in components]
    for c in absent:
        log(f"warning: {ms.path} has no {c}; the converted file will not have it either (generation needs all four)")
    tensors, counts = {}, {}
    for component in tqdm(components, desc="converting", unit="component", disable=not progress):
        # the folded cross-attention as its product, computed here once (in float32 or wider, rounded to dtype)
        model = load_component(ms, component, dtype=dtype, fold_product=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        counts[component] = sum(v.numel() for v in state.values())
        tensors.update({SVDLITE_PREFIXES[component] + k: v for k, v in state.items()})
        log(f"{component}: {len(state)} tensors, {counts[component]:,} parameters")
    dropped: dict[str, int] = {}
    for src in {id(s): s for s in ms.files.values()}.values():  # components may share one file
        for key in src.keys() - set(src.reads):  # TensorSource records every tensor it read
            reason = dropped_reason(key)
            dropped[reason] = dropped.get(reason, 0) + 1
    for reason, n in sorted(dropped.items()):
        log(f"dropped {n} tensors: {reason}")
    source_files = sorted({str(f) for s in ms.files.values() for f in s.files})
    # an older svdlite source's temporal convs hold the blend folded in (loading.mark_stored_blend): so do ours
    folded = {BLEND_METADATA_KEY: BLEND_FOLDED} if blend_is_stored_folded(ms.files["unet"]) else {}
    metadata = {**config_metadata(ms, components), **folded, "preset": ms.preset, "source": ms.path.name,
                "source_sha256": sha256_of(source_files, progress), "svdlite_version": __version__,
                "dtype": str(dtype).removeprefix("torch.")}
    write_svdlite(out, tensors, metadata, force=force)
    log(f"wrote {out} ({sum(counts.values()):,} parameters, {', '.join(components)})")
    return {"components": components, "params": counts, "dropped": dropped, "metadata": metadata}
