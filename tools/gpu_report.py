"""The GPU check's report (tools/gpu_check.py): the machine's description, the result as JSON, the printed tables.

A library module, not a command: tools/gpu_check.py imports it as `import gpu_report`.
  machine       versions, CPU, GPU and nvidia-smi's line
  jsonable      the result with what JSON cannot hold (inf, nan, dtypes, paths) as strings
  print_report  the parts' table, one section per part that ran, the failed checks
"""
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from benchlib import GIB


def machine(device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import svdlite

    info = {"svdlite": svdlite.__version__, "svdlite_path": str(Path(svdlite.__file__).parent),
            "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for package in ("diffusers", "transformers", "open_clip_torch", "numpy"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    if device.type == "cuda":
        info.update(gpu_info(device))
    return info


def gpu_info(device: torch.device) -> dict:
    p = torch.cuda.get_device_properties(device)
    info = dict(gpu=p.name, gpu_memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}",
                multiprocessors=p.multi_processor_count)
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    except (OSError, subprocess.SubprocessError) as err:
        info["nvidia_smi"] = f"unavailable: {err}"
    return info


def jsonable(x):
    """The result with non-finite floats as strings ("inf", "nan"): JSON has no such numbers."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (np.floating, np.integer)):
        return jsonable(x.item())
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    if isinstance(x, (torch.device, Path)):
        return str(x)
    return x


def _f(x, spec=".3g"):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


def _gib(x):
    return "-" if x is None else f"{x / GIB:.2f}"


# ------------------------------------------------------------------------------------------------ one section a part


def print_fidelity(x: dict, r: dict) -> None:
    print(f"\nfidelity, float32 on {r['device']}, TF32 off (limits: assert_close atol = rtol = 1e-4 as a ratio "
          "<= 1, or max |a-b| / max |ref| < 1e-4)")
    for row in x["reference"]:
        print(f"  {row['name']:<66}{_f(row['value']):>10}  limit {_f(row['limit'])}  rel {_f(row['rel_err'])}"
              f"  {'ok' if row['passed'] else 'FAIL'}")
    d = x["reference_unet_main_with_torch_default_tf32"]
    print(f"  (unet main out with torch's default float32 settings, cuDNN conv {d['cudnn_conv_fp32_precision']}: "
          f"ratio {_f(d['close_ratio'])}, rel {_f(d['rel_err'])})")
    e = x["unet_eval_device_vs_cpu"]
    print(f"  {e['width']}-width UNet eval ({e['batch']} rows, {e['pixels'][0]}x{e['pixels'][1]} px), device vs "
          f"CPU fp32: max rel {_f(e['rel_err'])} (limit {_f(e['limit_rel_err'])}), rel L2 {_f(e['rel_l2'])}"
          + (" [same device]" if e["same_device"] else ""))


def print_half(x: dict, r: dict) -> None:
    print(f"\nhalf precision vs float32 ({x['eval']['width']} width)")
    print(f"  {'':<44}{'float16':>12}{'bfloat16':>12}")
    ev, gen = x["eval"], x["generate"]
    for label, src, key in (("UNet eval rel L2", ev, "rel_l2"), ("UNet eval max rel", ev, "rel_err"),
                            ("generate final latents rel L2", gen, "latents_rel_l2"),
                            ("generate frames PSNR dB", gen, "frames_psnr_db"),
                            ("generate frames max step", gen, "frames_max_step")):
        print(f"  {label:<44}{_f(src['float16'][key]):>12}{_f(src['bfloat16'][key]):>12}")
    g = gen["settings"]
    print(f"  generate: {g['num_frames']} frames {g['width']}x{g['height']}, {g['num_inference_steps']} steps; "
          "seconds " + ", ".join(f"{k} {v:.2f}" for k, v in gen["seconds"].items()))


def print_speed_unet(x: dict, r: dict) -> None:
    print(f"\nUNet evaluation, {x['batch']} rows ({x['frames']} frames x 2), latent {x['latent'][0]}x"
          f"{x['latent'][1]}, {str(x['dtype'])}, {x['warmup']} warm-up + {x['rounds']} alternated rounds")
    for side in ("svdlite", "diffusers"):
        st = x["seconds"][side]
        print(f"  {side:<10} median {st['median'] * 1e3:9.1f} ms (min {st['min'] * 1e3:.1f}, max "
              f"{st['max'] * 1e3:.1f}); {x['macs'][side] / 1e12:.4g} T MACs; {x[side + '_tflops']:.4g} TFLOP/s = "
              f"{x[side + '_fraction_of_peak']:.0%} of the peak")
    rt = x["ratio_diffusers_over_svdlite"]
    print(f"  diffusers/svdlite time per round: median {rt['median']:.3f} (min {rt['min']:.3f}, max "
          f"{rt['max']:.3f}); outputs max rel {_f(x['agreement']['rel_err'])}")
    print(f"  peak: {x['peak_tflops_used']:.4g} TFLOP/s, {x['peak_note']} ("
          + ", ".join(f"{k} {v['tflops']:.4g}" for k, v in x["peak_matmul"].items()) + ")")


def print_speed_generate(x: dict, r: dict) -> None:
    st = x["settings"]
    print(f"\nwhole generate, {st['num_frames']} frames {st['width']}x{st['height']}, {st['num_inference_steps']} "
          f"steps, decode chunk {st['decode_chunk_size']}, {str(x['dtype'])}, 1 warm-up + {x['rounds']} rounds")
    for side in ("svdlite", "diffusers"):
        s = x["seconds"][side]
        print(f"  {side:<10} median {s['median']:8.2f} s (min {s['min']:.2f}, max {s['max']:.2f})")
    rt = x["ratio_diffusers_over_svdlite"]
    a = x["agreement"]
    print(f"  diffusers/svdlite: median {rt['median']:.3f}; final latents max rel {_f(a['latents_rel_err'])}, "
          f"frames PSNR {_f(a['frames_psnr_db'])} dB")
    print(f"  ({x['note']})")


def print_memory(x: dict, r: dict) -> None:
    if not x["measured"]:
        print(f"\nmemory: not measured on {x['device']} (torch.cuda.max_memory_allocated needs CUDA)")
        return
    u, gd = x["unet_eval"], x["generate_default"]
    print("\nmemory (torch.cuda.max_memory_allocated, GiB)")
    print(f"  UNet eval {u['frames']} frames {u['pixels'][1]}x{u['pixels'][0]} px, above resident weights: "
          + ", ".join(f"{s} {_gib(u[s]['memory']['above_resident'])} (weights {_gib(u[s]['weights_bytes'])})"
                      for s in ("svdlite", "diffusers")))
    st = gd["settings"]
    print(f"  generate at SVD-XT's defaults ({st['num_frames']} frames, {st['num_inference_steps']} steps, "
          f"{st['width']}x{st['height']}, chunk {st['decode_chunk_size']}): "
          + ", ".join(f"{s} peak {_gib(gd[s]['memory']['peak'])} (weights {_gib(gd[s]['weights_bytes'])}, "
                      f"{gd[s]['seconds']:.1f} s)" for s in ("svdlite", "diffusers")))


def print_levels(x: dict, r: dict) -> None:
    print("\nspeed levels: " + ", ".join(f"{k} {v:.2f}s ({x['steps'][k]} steps, x{x['speedup_vs_exact'][k]:.2f})"
                                          for k, v in x["seconds"].items()))


def print_compile(x: dict, r: dict) -> None:
    print(f"\ntorch.compile (mode {x['mode']}): compile (first call) "
          + ", ".join(f"{k} {v:.1f}s" for k, v in x["compile_seconds"].items())
          + "".join(f"; {k}: {v[:120]}" for k, v in x["errors"].items()))
    for k, st in x["seconds"].items():
        print(f"  {k:<20} median {st['median'] * 1e3:9.1f} ms  {x['tflops'][k]:.4g} TFLOP/s")
    for k, st in x.get("speedup_compiled", {}).items():
        print(f"  {k} eager/compiled: median {st['median']:.3f}")


SECTIONS = {"fidelity": print_fidelity, "half": print_half, "speed_unet": print_speed_unet,
            "speed_generate": print_speed_generate, "memory": print_memory, "levels": print_levels,
            "compile": print_compile}


# ------------------------------------------------------------------------------------------------ the whole report


def print_header(r: dict) -> None:
    """The command, the machine, the weights and the parts' table (status and seconds)."""
    m = r["machine"]
    where = (f"{m.get('gpu')} ({_gib(m.get('gpu_memory_bytes'))} GiB, sm {m.get('capability')}), "
             f"nvidia-smi: {m.get('nvidia_smi')}" if "gpu" in m else m["cpu"])
    print(f"\ncommand: {r['command']}")
    print(f"svdlite {m['svdlite']} from {m['svdlite_path']}")
    print(f"device: {r['device']}: {where}; torch {m['torch']} (CUDA {m['torch_cuda']}), diffusers {m['diffusers']}, "
          f"transformers {m['transformers']}, open_clip {m['open_clip_torch']}; {m['cpu']}, {m['threads']} threads")
    su = r.get("setup", {})
    if "params" in su:
        print(f"weights: random {su['width']}-width pipeline, params {su['params']}; built and written "
              f"{su['build_seconds']:.1f}s, read back {su['write_seconds']:.1f}s ({_gib(su['folder_bytes'])} GiB fp16)")
    print(f"\n{'part':<16}{'status':<10}{'seconds':>9}")
    for name, part in r["parts"].items():
        print(f"{name:<16}{part['status']:<10}{_f(part.get('seconds'), '.1f'):>9}  {part.get('error', '')[:100]}")
    print(f"total {r['total_seconds']:.1f}s (budget {r['budget_s']}s)")


def print_checks(checks: list[dict]) -> None:
    failed = [c for c in checks if not c["passed"]]
    print(f"\nchecks: {len(checks) - len(failed)} of {len(checks)} passed")
    for c in failed:
        print(f"  FAILED {c['part']}: {c['name']}: {_f(c['value'])} (limit {c['kind']} {_f(c['limit'])})")


def print_report(r: dict) -> None:
    print_header(r)
    for name, section in SECTIONS.items():
        part = r["parts"].get(name, {})
        if part.get("status") != "ok":
            continue
        try:
            section(part["result"], r)
        except Exception as err:  # noqa: BLE001 - a printing slip must not hide the rest
            print(f"  ({name}: cannot print: {err!r})")
    print_checks(r["checks"])


if __name__ == "__main__":
    sys.exit("tools/gpu_report.py is a module of tools/gpu_check.py, not a command: python tools/gpu_check.py --help")
