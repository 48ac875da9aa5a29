#!/usr/bin/env python3
"""svdlite against diffusers on the SAME weights: UNet evaluation, loading, whole runs; and VCUT within svdlite.

    python tools/benchmark.py [--parts unet,loading,generate] [--width full|mid|tiny] [--sizes 128x128,256x256]
                              [--frames N] [--repeats R] [--warmup N] [--seed S] [--threads N] [--no-unfolded]
                              [--profile] [--quick] [--json [PATH]]

Parts (`--parts`, default unet):
  unet      below; at each `--sizes` (pixels; 128x128 and 256x256 are 16x16 and 32x32 latents), with the MACs of
            the evaluation (tools/count_macs.py, full width) beside this machine's fp32 product rates measured in
            the same run (best of five 2048^3 products as torch matmul and as a oneDNN 1x1 convolution, the faster
            being the compute roofline): the achieved fraction of the roofline;
  loading   the full-size UNet loaded to float32 and float16 in fresh processes, diffusers from its fp16 folder,
            svdlite from that folder, an original-layout fp16 file and its converted file (tools/bench_loading.py);
  generate  a whole `generate` against `StableVideoDiffusionPipeline`, same image and noise, 14 frames, 128x128,
            3 steps, decoding included, each run a fresh process (tools/bench_generate.py).
`--quick` is a reduced run (tiny width, one size, two rounds, generate at tiny width once) in under three minutes.
`--json PATH` writes the result (an existing PATH is refused unless `--force`; written under a temporary name and
renamed, once before the generate part too, so what was measured survives its failure); `--json` alone prints it
instead of the tables.

One CFG-doubled UNet evaluation (batch 2*frames, as every guided sampling step runs it), three ways:
  diffusers   `UNetSpatioTemporalConditionModel.forward` (diffusers as installed, AttnProcessor2_0 / SDPA);
  svdlite     `VideoUNet` as loaded by `load_unet` (cross-attention folded, VCUT), with the context vectors
              computed once outside the timed call, as `svdlite.denoiser.make_denoiser` does;
  unfolded    `VideoUNet(fold_cross_attention=False)`, the original cross-attention at every call (ablation).
The diffusers model gets random weights (`svdlite.testing.random_tensors` over its state-dict shapes, seeded), is
saved in diffusers layout (config.json + diffusion_pytorch_model.safetensors) to a temporary folder, and svdlite
loads that folder twice (folded, unfolded), so all three run the same weights. Their outputs are compared first
(max |a - b| / max |reference|, reference = svdlite folded); diffusers as shipped differs slightly because it uses
GroupNorm eps 1e-6 in some ResBlocks where the original (and svdlite) use 1e-5, so it is also compared with the
original eps put back. (At tiny width with 1-2 frames the check is ill-conditioned: the deepest level is 1x1 with
one channel per GroupNorm group, so a group holds only T values; use >= 3 frames there.)

Timing: warm-up calls first, then `--repeats` rounds; each round calls every variant once, back to back in this
process (the order rotates from round to round), under torch.no_grad. Reported: per-call median seconds (with
min-max) and the per-round ratios diffusers/svdlite and unfolded/folded (median, min-max). Timings on a shared
2-core machine are noisy: read the ratios, not the seconds.

`--width full` is SVD's network (UNetConfig(), 1.5B parameters, ~6 GB per fp32 copy, three copies ~18 GB);
if the free memory after the first two copies cannot hold the third, the run is phased: diffusers vs svdlite,
then the diffusers copy is freed and the unfolded one loaded for svdlite vs unfolded (reported as `phased`).
`--width tiny` is the bundled tiny model's network (model_channels 32, all four levels), for a quick check.
`--profile` adds a torch.profiler table (top ops by self CPU time) of one call of each variant.
"""
import argparse
import gc
import importlib.util
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from svdlite.loading import load_unet
from svdlite.testing import random_tensors, unet_call_inputs
from svdlite.unet import UNetConfig
from svdlite.unet_keymap import diffusers_unet_params
from svdlite.outputs import add_force, check_outputs, write_text


WIDTHS = {
    "full": UNetConfig(),
    # SVD's first two levels at full width (its largest activations, 11% of its parameters): fits beside others
    "mid": UNetConfig(channel_mult=(1, 2), attention_resolutions=(1,)),
    # tools/make_tiny_model.py's network: SVD's structure (4 levels, attention on 3) at width 32
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 1, 1, 1), num_head_channels=16, context_dim=64),
}
VARIANTS = ("diffusers", "svdlite", "unfolded")
# max |a - b| / max |svdlite|. The float32 noise floor of these random networks is itself ~5e-5 (measured at tiny
# width: svdlite fp32 vs fp64 4e-5; in fp64 the fold matches the unfolded network to 2e-8, diffusers with the
# original eps matches to float64 noise, diffusers as shipped differs by 7e-5 (its eps)), hence these bounds.
TOLERANCE = {"unfolded": 5e-4, "diffusers_sgm_eps": 5e-4, "diffusers": 1e-3}
GIB = 1024 ** 3


def build_diffusers_unet(config: UNetConfig, frames: int, seed: int):
    """diffusers' UNet for `config`, built on the meta device and given random_tensors(seed) weights (fp32)."""
    from diffusers import UNetSpatioTemporalConditionModel

    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel(**diffusers_unet_params(config, frames))
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    unet.load_state_dict(random_tensors(shapes, seed), strict=True, assign=True)
    left = [n for n, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"diffusers UNet tensors left on the meta device: {left[:5]}")
    return unet.eval().requires_grad_(False)


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def mem_available() -> int:
    """Bytes the kernel reports as available (MemAvailable), or a large number where /proc is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


class Runner:
    """Holds the models and a zero-argument call for each variant."""

    def __init__(self, inputs: dict):
        self.inputs, self.models, self.calls = inputs, {}, {}

    def add(self, name: str, model) -> None:
        self.models[name] = model
        t = self.inputs["frames"]
        if name == "diffusers":
            args = self.inputs["diffusers"]
            self.calls[name] = lambda: model(*args, return_dict=False)[0].flatten(0, 1)
        else:
            x, ts, context, y = self.inputs["svdlite"]
            with torch.no_grad():
                vectors = model.context_vectors(context, t)  # once per video, outside the timed call
            self.calls[name] = lambda: model(x, ts, None, y, t, context_vectors=vectors)

    def drop(self, name: str) -> None:
        self.calls.pop(name)
        self.models.pop(name)
        gc.collect()

    def run(self, name: str) -> torch.Tensor:
        with torch.no_grad():
            return self.calls[name]()


def diffusers_with_sgm_eps(runner: Runner) -> torch.Tensor:
    """diffusers' output with GroupNorm eps 1e-5 in every ResBlock (the original's), eps restored afterwards."""
    changed = [m for name, m in runner.models["diffusers"].named_modules()
               if isinstance(m, torch.nn.GroupNorm) and ".resnets." in f".{name}." and m.eps != 1e-5]
    old = [m.eps for m in changed]
    try:
        for m in changed:
            m.eps = 1e-5
        return runner.run("diffusers")
    finally:
        for m, eps in zip(changed, old):
            m.eps = eps


def time_interleaved(runner: Runner, names, repeats: int, warmup: int, log) -> dict[str, list[float]]:
    """{name: [seconds per round]}: warm-up calls, then `repeats` rounds calling every variant once, rotating."""
    for _ in range(warmup):
        for name in names:
            runner.run(name)
    times = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            runner.run(name)
            times[name].append(time.perf_counter() - start)
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    return times


def _loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages: another busy process on this 2-core machine distorts the timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "all": values}


def profile_calls(runner: Runner, names, rows: int = 12) -> dict[str, str]:
    """torch.profiler tables (top ops by self CPU time) of one call of each variant."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for name in names:
        runner.run(name)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runner.run(name)
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return tables


def product_rates(threads: int, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """This machine's fp32 rate for one n x n x n product (MAC/s, best of `repeats`) through each kernel family the
    networks use: "matmul" (`a @ b`, torch's GEMM, what diffusers' linear layers run) and "linear_as_conv"
    (`layers.linear`, the same product as a oneDNN 1x1 convolution, what svdlite's linear layers run). The faster
    is the compute roofline: on an AVX2 machine the two were within 10-40% of each other, on an AVX-512 one oneDNN's
    convolution ran well ahead of the GEMM (docs/SPEED.md)."""
    from svdlite.layers import linear

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    rates = {}
    for name, product in (("matmul", lambda: a @ b), ("linear_as_conv", lambda: linear(a, b))):
        product()
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
        rates[name] = n ** 3 / best
    return rates


def unet_macs(frames: int, height: int, width: int) -> int | None:
    """MACs of one guided evaluation of SVD's UNet (tools/count_macs.py), or None where it cannot count."""
    try:
        sys.path.insert(0, str(Path(__file__).parent))
        from count_macs import unet_eval_macs
        return unet_eval_macs("vcut", 2 * frames, frames, height, width)[0]
    except Exception:  # noqa: BLE001 - the MAC count is an annotation; the timings stand without it
        return None


def benchmark(config: UNetConfig, frames: int = 14, height: int = 64, width: int = 64, repeats: int = 5,
              warmup: int = 1, seed: int = 0, profile: bool = False, log=None, workdir=None,
              phased: bool | None = None, sizes: list[tuple[int, int]] | None = None, unfolded: bool = True) -> dict:
    """Build, check and time the variants at each size (pixels; default [(height, width)]); returns the result.

    phased: None decides from the free memory; True / False force the phased / all-three run.
    unfolded=False leaves the ablation out. The top-level `equality`, `seconds_per_call`, `ratios` are the first
    size's; `sizes` holds every size's. Raises nothing on a failed equality check: `result["equality"]["passed"]`
    (and each size's) says it (timings still run)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    sizes = sizes or [(height, width)]
    inputs = {hw: unet_call_inputs(config, frames, hw[0], hw[1], seed) for hw in sizes}
    variants = list(VARIANTS) if unfolded else ["diffusers", "svdlite"]
    result = {"config": config.to_dict(), "params_diffusers": None, "frames": frames, "batch": 2 * frames,
              "height": sizes[0][0], "width": sizes[0][1], "latent": [sizes[0][0] // 8, sizes[0][1] // 8],
              "repeats": repeats, "warmup": warmup, "seed": seed, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "load_average_start": _loadavg(), "variants": variants}
    import diffusers
    result["diffusers_version"] = diffusers.__version__
    runners = {hw: Runner(inputs[hw]) for hw in sizes}
    outputs = {hw: {} for hw in sizes}
    with tempfile.TemporaryDirectory(prefix="svdlite-bench-", dir=workdir) as tmp:
        start = time.perf_counter()
        unet = build_diffusers_unet(config, frames, seed)
        n_params = sum(p.numel() for p in unet.parameters())
        result["params_diffusers"] = n_params
        log(f"built diffusers UNet ({n_params:,} params, random weights seed {seed}) in "
            f"{time.perf_counter() - start:.1f}s; saving to {tmp}")
        unet.save_pretrained(tmp, safe_serialization=True, max_shard_size="100GB")
        start = time.perf_counter()
        svd = load_unet(tmp)
        log(f"loaded svdlite (folded) from the diffusers folder in {time.perf_counter() - start:.1f}s")
        if svd.config != config:
            raise AssertionError(f"svdlite read {svd.config} from config.json, expected {config}")
        for hw, runner in runners.items():
            runner.add("diffusers", unet)
            runner.add("svdlite", svd)
            outputs[hw] = {"svdlite": runner.run("svdlite"), "diffusers": runner.run("diffusers"),
                           "diffusers_sgm_eps": diffusers_with_sgm_eps(runner)}
        del unet, svd
        need = n_params * 4 * 1.15 + 2 * GIB  # the unfolded copy plus its load-time temporaries, and headroom
        if phased is None:
            phased = unfolded and mem_available() < need
        phases = {hw: [] for hw in sizes}
        if phased or not unfolded:
            if phased:
                log(f"free memory {mem_available() / GIB:.1f} GiB, {need / GIB:.1f} GiB needed for a third copy: "
                    "phased run; phase 1: diffusers vs svdlite")
            for hw, runner in runners.items():
                log(f"{hw[0]}x{hw[1]} px:")
                phases[hw].append(time_interleaved(runner, ["diffusers", "svdlite"], repeats, warmup, log))
                if profile:
                    profiles = result.setdefault("profiles", {})
                    profiles[f"{hw[0]}x{hw[1]}"] = profile_calls(runner, ["diffusers", "svdlite"])
            for runner in runners.values():
                runner.drop("diffusers")
        if unfolded:
            start = time.perf_counter()
            model = load_unet(tmp, fold_cross_attention=False)
            log(f"loaded svdlite unfolded in {time.perf_counter() - start:.1f}s")
            for hw, runner in runners.items():
                runner.add("unfolded", model)
                outputs[hw]["unfolded"] = runner.run("unfolded")
            del model
    result["memory_mode"] = "phased" if phased else ("all three loaded" if unfolded else "diffusers and svdlite")
    rates = product_rates(torch.get_num_threads())
    rate = max(rates.values())
    result.update(matmul_mac_per_s=rates["matmul"], linear_as_conv_mac_per_s=rates["linear_as_conv"],
                  roofline_mac_per_s=rate)
    result["sizes"] = []
    for hw, runner in runners.items():
        ref = outputs[hw]["svdlite"]
        diffs = {name: rel_diff(outputs[hw][name], ref) for name in TOLERANCE if name in outputs[hw]}
        eq = {"max_rel_diff_vs_svdlite": diffs, "tolerance": TOLERANCE, "output_max_abs": ref.abs().max().item(),
              "output_shape": list(ref.shape),
              "passed": all(diffs[k] <= TOLERANCE[k] and math.isfinite(diffs[k]) for k in diffs)}
        log(f"{hw[0]}x{hw[1]} equality (max rel diff vs svdlite folded): "
            + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        if phased:
            log(f"phase 2 at {hw[0]}x{hw[1]}: svdlite vs unfolded")
            phases[hw].append(time_interleaved(runner, ["svdlite", "unfolded"], repeats, warmup, log))
            if profile:
                result["profiles"][f"{hw[0]}x{hw[1]}"]["unfolded"] = profile_calls(runner, ["unfolded"])["unfolded"]
        elif unfolded:
            log(f"{hw[0]}x{hw[1]}: timing all three interleaved: {warmup} warm-up + {repeats} rounds")
            phases[hw].append(time_interleaved(runner, variants, repeats, warmup, log))
            if profile:
                result.setdefault("profiles", {})[f"{hw[0]}x{hw[1]}"] = profile_calls(runner, variants)
        times = {n: [s for ph in phases[hw] for s in ph.get(n, [])] for n in variants}
        ratios = {"diffusers/svdlite": []}
        if unfolded:
            ratios["unfolded/svdlite"] = []
        for ph in phases[hw]:
            for num, key in (("diffusers", "diffusers/svdlite"), ("unfolded", "unfolded/svdlite")):
                if num in ph:
                    ratios[key] += [a / b for a, b in zip(ph[num], ph["svdlite"])]
        macs = unet_macs(frames, *hw) if config == UNetConfig() else None
        row = {"height": hw[0], "width": hw[1], "latent": [hw[0] // 8, hw[1] // 8], "equality": eq,
               "seconds_per_call": {n: _stats(v) for n, v in times.items()},
               "ratios": {k: _stats(v) for k, v in ratios.items()},
               "svdlite/diffusers": _stats([b / a for a, b in zip(*(
                   [s for ph in phases[hw] for s in ph.get(n, [])] for n in ("diffusers", "svdlite")))]),
               "macs": macs}
        if macs:
            svd_rate = macs / row["seconds_per_call"]["svdlite"]["median"]
            row.update(svdlite_mac_per_s=svd_rate, svdlite_fraction_of_roofline=svd_rate / rate,
                       diffusers_mac_per_s=macs / row["seconds_per_call"]["diffusers"]["median"])
        result["sizes"].append(row)
    first = result["sizes"][0]
    result.update(equality=first["equality"], seconds_per_call=first["seconds_per_call"], ratios=first["ratios"])
    if profile:
        result["profile"] = result["profiles"][f"{sizes[0][0]}x{sizes[0][1]}"]
    result["load_average_end"] = _loadavg()
    return result


def print_table(r: dict, command: str) -> None:
    cfg = r["config"]
    print(f"command: {command}")
    print(f"UNet, one CFG-doubled evaluation: batch {r['batch']} (2 x {r['frames']} frames), fp32 CPU, "
          f"{r['threads']} threads")
    print(f"network: model_channels {cfg['model_channels']}, channel_mult {tuple(cfg['channel_mult'])} "
          f"({r['params_diffusers']:,} params in diffusers' layout); same random weights (seed {r['seed']}) on "
          "every side")
    print(f"torch {r['torch']}, diffusers {r['diffusers_version']}; {r['warmup']} warm-up call(s), {r['repeats']} "
          f"interleaved rounds; memory: {r['memory_mode']}")
    print(f"load average (1/5/15 min) at start {r['load_average_start']}, at end {r['load_average_end']} "
          f"(> {r['threads']} means other processes competed for the cores)")
    print(f"fp32 product rate measured in this run (2048^3, best of 5): torch matmul {r['matmul_mac_per_s'] / 1e9:.1f} "
          f"GMAC/s, as a oneDNN 1x1 convolution (layers.linear) {r['linear_as_conv_mac_per_s'] / 1e9:.1f} GMAC/s; "
          f"roofline = the faster")
    labels = {"unfolded": "svdlite unfolded (fold_cross_attention=False)",
              "diffusers_sgm_eps": "diffusers with the original GroupNorm eps 1e-5",
              "diffusers": "diffusers as shipped (eps 1e-6 in some ResBlocks)"}
    names = {"diffusers": "diffusers UNetSpatioTemporalConditionModel", "svdlite": "svdlite VideoUNet (VCUT fold)",
             "unfolded": "svdlite unfolded (ablation)"}
    for row in r["sizes"]:
        eq = row["equality"]
        print(f"\n{row['height']}x{row['width']} px (latent {row['latent'][0]}x{row['latent'][1]}); output check "
              f"(max |a - svdlite| / max |svdlite|, |svdlite| max {eq['output_max_abs']:.3g}): "
              f"{'PASSED' if eq['passed'] else 'FAILED'}")
        for k, v in eq["max_rel_diff_vs_svdlite"].items():
            print(f"  {labels[k]:<50}{v:>10.2e}   (tolerance {eq['tolerance'][k]:.0e})")
        header = f"{'variant':<44}{'median s/call':>14}{'min':>9}{'max':>9}{'n':>4}{'GMAC/s':>9}"
        print(header)
        print("-" * len(header))
        for n, st in row["seconds_per_call"].items():
            rate = f"{row['macs'] / st['median'] / 1e9:>9.1f}" if row["macs"] and n != "unfolded" else ""
            print(f"{names[n]:<44}{st['median']:>14.3f}{st['min']:>9.3f}{st['max']:>9.3f}{st['n']:>4}{rate}")
        st = row["svdlite/diffusers"]
        print(f"{'svdlite/diffusers time (per round, median)':<44}{st['median']:>14.3f}{st['min']:>9.3f}"
              f"{st['max']:>9.3f}")
        if "unfolded/svdlite" in row["ratios"]:
            st = row["ratios"]["unfolded/svdlite"]
            print(f"{'unfolded/svdlite time (>1: fold faster)':<44}{st['median']:>14.3f}{st['min']:>9.3f}"
                  f"{st['max']:>9.3f}")
        if row["macs"]:
            print(f"MACs per evaluation (tools/count_macs.py): {row['macs'] / 1e9:.1f} G; svdlite at "
                  f"{row['svdlite_fraction_of_roofline']:.0%} of the roofline")
    if "profile" in r:
        for n, table in r["profile"].items():
            print(f"\ntorch.profiler, one call of {n} (top ops by self CPU time):\n{table}")


QUICK = {"sizes": [(128, 128)], "repeats": 2, "warmup": 1, "loading_rounds": 1, "loading_dtypes": ("fp16",)}


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'128x128,256x256' -> [(128, 128), (256, 256)] (pixels)."""
    try:
        return [tuple(int(v) for v in part.split("x")) for part in text.split(",")]
    except ValueError as err:
        raise ValueError(f"--sizes takes HxW pixel sizes separated by commas, got {text!r}") from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="exit codes: 0 done, 1 the outputs compared disagree, 2 refused "
                                            "(bad arguments, --json PATH exists without --force)")
    parser.add_argument("--width", choices=sorted(WIDTHS), help="network width (default full: SVD's; --quick: tiny)")
    parser.add_argument("--frames", type=int, default=14)
    parser.add_argument("--height", type=int, default=64, help="pixels (latent = /8)")
    parser.add_argument("--width-px", type=int, default=64, help="pixels (latent = /8)")
    parser.add_argument("--sizes", help="several pixel sizes, e.g. 128x128,256x256 (latents 16x16 and 32x32); "
                                        "overrides --height/--width-px")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="add torch.profiler top-op tables")
    parser.add_argument("--phased", action="store_true",
                        help="never hold three models at once (automatic when memory is short)")
    parser.add_argument("--no-unfolded", action="store_true", help="leave out the unfolded ablation")
    parser.add_argument("--parts", default="unet",
                        help="comma-separated: unet (one guided evaluation at each size), loading (the full-size "
                             "UNet in fresh processes, tools/bench_loading.py), generate (whole runs against "
                             "StableVideoDiffusionPipeline in fresh processes, tools/bench_generate.py); default unet")
    parser.add_argument("--generate-width", choices=("full", "tiny"), default="full",
                        help="network width of the whole-run comparison (--quick: tiny)")
    parser.add_argument("--generate-rounds", type=int, default=3)
    parser.add_argument("--loading-rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="reduced run (< 3 min): tiny width unless --width, 128x128 px only, 2 rounds, no "
                             "ablation; loading to fp16 once, generate at tiny width once, if in --parts")
    parser.add_argument("--workdir", help="where the temporary files go (default: the system temp dir)")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the result as JSON to PATH (alone: print it instead of the table)")
    add_force(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and args.json != "-":
        check_outputs(parser, [Path(args.json)], args.force)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join([sys.executable, "tools/benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        sizes = parse_sizes(args.sizes) if args.sizes else [(args.height, args.width_px)]
    except ValueError as e:
        parser.error(str(e))
    repeats, warmup, unfolded = args.repeats, args.warmup, not args.no_unfolded
    if args.quick:
        sizes, repeats, warmup, unfolded = QUICK["sizes"], QUICK["repeats"], QUICK["warmup"], False
    args.width = args.width or ("tiny" if args.quick else "full")
    parts = set(args.parts.split(","))
    if not parts or parts - {"unet", "loading", "generate"}:
        parser.error(f"--parts takes unet, loading and/or generate, got {args.parts!r}")
    if "loading" in parts and importlib.util.find_spec("accelerate") is None:
        parser.error("--parts loading compares against diffusers' recommended loader, which needs accelerate "
                     "(low_cpu_mem_usage): pip install -e '.[bench]'")
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "load_average_start": _loadavg(),
              "sizes": [], "equality": {"passed": True}}
    if "unet" in parts:
        try:
            result = benchmark(WIDTHS[args.width], args.frames, sizes[0][0], sizes[0][1], repeats, warmup,
                               args.seed, args.profile, workdir=args.workdir, phased=True if args.phased else None,
                               sizes=sizes, unfolded=unfolded)
        except ValueError as e:
            parser.error(str(e))
    result["command"] = command
    result["network"] = args.width
    if "loading" in parts:
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_loading
        with tempfile.TemporaryDirectory(prefix="svdlite-bench-load-", dir=args.workdir) as tmp:
            log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
            paths = bench_loading.write_files(Path(tmp), args.seed, log)
            result["loading"] = bench_loading.measure_loading(
                paths, QUICK["loading_dtypes"] if args.quick else ("fp32", "fp16"),
                QUICK["loading_rounds"] if args.quick else args.loading_rounds, torch.get_num_threads(),
                1_524_000_000, log)  # SVD's UNet in diffusers' layout: 1,524,502,442 parameters
        result["load_average_end"] = _loadavg()
    if "generate" in parts:
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_generate
        with tempfile.TemporaryDirectory(prefix="svdlite-bench-gen-", dir=args.workdir) as tmp:
            log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
            if args.json and args.json != "-":  # what is measured so far survives a failure of this part
                write_text(args.json, json.dumps(result, indent=1))
            result["generate"] = bench_generate.measure_generate(
                Path(tmp), "tiny" if args.quick else args.generate_width, 1 if args.quick else args.generate_rounds,
                torch.get_num_threads(), args.seed, log)
        result["load_average_end"] = _loadavg()
    if args.json and args.json != "-":
        write_text(args.json, json.dumps(result, indent=1))
    if args.json == "-":
        print(json.dumps(result, indent=1))
    else:
        if "unet" in parts:
            print_table(result, command)
        else:
            print(f"command: {command}\nload average at start {result['load_average_start']}, at end "
                  f"{result['load_average_end']}; {result['threads']} threads")
        if "loading" in result:
            import bench_loading
            bench_loading.print_loading(result["loading"])
        if "generate" in result:
            import bench_generate
            bench_generate.print_generate(result["generate"])
    if "generate" in result and not result["generate"]["agree"]:
        print("ERROR: svdlite's and diffusers' whole runs do not agree", file=sys.stderr)
        return 1
    if not result["equality"]["passed"] or not all(row["equality"]["passed"] for row in result["sizes"]):
        print("ERROR: the variants do not compute the same function; the timings compare different programs",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
