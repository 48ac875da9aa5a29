"""`svdlite info`: what a checkpoint holds, described from its header and read plans, nothing loaded."""
import torch

from .components import resolve_model_path
from .formats import COMPONENTS, SVDLITE_FORMAT, open_model_source
from .loading import planned_component
from .presets import PRESETS
from .tensor_source import SAFETENSORS_DTYPES, TensorSource


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
        _, shapes, plan, scope, _ = planned_component(ms, component)
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
