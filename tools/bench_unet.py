"""One CFG-doubled UNet evaluation, svdlite against diffusers on the SAME weights (tools/benchmark.py --parts unet).

A module of tools/benchmark.py (which runs it and prints its table), not a command of its own.

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
2-core machine are noisy: read the ratios, not the seconds. At each size, with the MACs of the evaluation
(tools/count_macs.py, full width only) beside this machine's fp32 product rates measured in the same run (best of
five 2048^3 products as torch matmul and as a oneDNN 1x1 convolution, the faster being the compute roofline): the
achieved fraction of the roofline.

`--width full` is SVD's network (UNetConfig(), 1.5B parameters, ~6 GB per fp32 copy, three copies ~18 GB);
if the free memory after the first two copies cannot hold the third, the run is phased: diffusers vs svdlite,
then the diffusers copy is freed and the unfolded one loaded for svdlite vs unfolded (reported as `phased`).
`--width tiny` is the bundled tiny model's network (model_channels 32, all four levels), for a quick check.
`--profile` adds a torch.profiler table (top ops by self CPU time) of one call of each variant.
"""
import gc
import math
import sys
import tempfile
import time

import torch

import benchlib
from svdlite.loading import load_unet
from svdlite.testing import unet_call_inputs
from svdlite.unet import UNetConfig

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
PAIR = ["diffusers", "svdlite"]


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


def unet_macs(frames: int, height: int, width: int) -> int | None:
    """MACs of one guided evaluation of SVD's UNet (tools/count_macs.py), or None where it cannot count."""
    try:
        from count_macs import unet_eval_macs
        return unet_eval_macs("vcut", 2 * frames, frames, height, width)[0]
    except Exception:  # noqa: BLE001 - the MAC count is an annotation; the timings stand without it
        return None


def benchmark(config: UNetConfig, frames: int = 14, height: int = 64, width: int = 64, repeats: int = 5,
              warmup: int = 1, seed: int = 0, profile: bool = False, log=None, workdir=None,
              phased: bool | None = None, sizes: list[tuple[int, int]] | None = None, unfolded: bool = True) -> dict:
    """Build, check and time the variants at each size (pixels; default [(height, width)]); returns the result.

    phased: None decides from the free memory; True / False force the phased / all-three run (without the
    unfolded ablation there is no third copy: never phased). unfolded=False leaves the ablation out. The top-level
    `equality`, `seconds_per_call`, `ratios` are the first size's; `sizes` holds every size's. Raises nothing on a
    failed equality check: `result["equality"]["passed"]` (and each size's) says it (timings still run)."""
    log = log or benchlib.log
    sizes = sizes or [(height, width)]
    runners = {hw: Runner(unet_call_inputs(config, frames, hw[0], hw[1], seed)) for hw in sizes}
    variants = list(VARIANTS) if unfolded else list(PAIR)
    result = _new_result(config, frames, sizes, repeats, warmup, seed, variants)
    phases = {hw: [] for hw in sizes}  # per size: one {variant: [seconds per round]} per timed phase
    with tempfile.TemporaryDirectory(prefix="svdlite-bench-", dir=workdir) as tmp:
        outputs, result["params_diffusers"] = _load_folded(config, frames, seed, tmp, runners, log)
        phased = _decide_phased(phased, unfolded, result["params_diffusers"])
        if phased or not unfolded:
            _time_first_pair(runners, phases, phased, repeats, warmup, profile, result, log)
        if unfolded:
            _add_unfolded(tmp, runners, outputs, log)
    result["memory_mode"] = "phased" if phased else ("all three loaded" if unfolded else "diffusers and svdlite")
    rates = benchlib.product_rates(torch.get_num_threads())
    rate = max(rates.values())
    result.update(matmul_mac_per_s=rates["matmul"], linear_as_conv_mac_per_s=rates["linear_as_conv"],
                  roofline_mac_per_s=rate)
    result["sizes"] = []
    for hw, runner in runners.items():
        eq = _equality(hw, outputs[hw], log)
        _time_the_rest(hw, runner, phases[hw], phased, variants, repeats, warmup, profile, result, log)
        macs = unet_macs(frames, *hw) if config == UNetConfig() else None
        result["sizes"].append(_size_row(hw, eq, phases[hw], variants, macs, rate))
    first = result["sizes"][0]
    result.update(equality=first["equality"], seconds_per_call=first["seconds_per_call"], ratios=first["ratios"])
    if profile:
        result["profile"] = result["profiles"][f"{sizes[0][0]}x{sizes[0][1]}"]
    result["load_average_end"] = benchlib.loadavg()
    return result


def _new_result(config: UNetConfig, frames: int, sizes, repeats: int, warmup: int, seed: int, variants) -> dict:
    """The result's settings part (the first size's at the top level)."""
    (h, w) = sizes[0]
    result = {"config": config.to_dict(), "params_diffusers": None, "frames": frames, "batch": 2 * frames,
              "height": h, "width": w, "latent": [h // 8, w // 8], "repeats": repeats, "warmup": warmup,
              "seed": seed, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_average_start": benchlib.loadavg(), "variants": variants}
    import diffusers
    result["diffusers_version"] = diffusers.__version__
    return result


def _load_folded(config: UNetConfig, frames: int, seed: int, folder: str, runners: dict, log) -> tuple[dict, int]:
    """diffusers' UNet with random weights, saved to `folder`, and svdlite's (folded) loaded from there, both added
    to every runner; returns ({size: {variant: output}}, diffusers' parameter count)."""
    start = time.perf_counter()
    unet = benchlib.build_diffusers_unet(config, frames, seed)
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"built diffusers UNet ({n_params:,} params, random weights seed {seed}) in "
        f"{time.perf_counter() - start:.1f}s; saving to {folder}")
    unet.save_pretrained(folder, safe_serialization=True, max_shard_size="100GB")
    start = time.perf_counter()
    svd = load_unet(folder)
    log(f"loaded svdlite (folded) from the diffusers folder in {time.perf_counter() - start:.1f}s")
    if svd.config != config:
        raise AssertionError(f"svdlite read {svd.config} from config.json, expected {config}")
    outputs = {}
    for hw, runner in runners.items():
        runner.add("diffusers", unet)
        runner.add("svdlite", svd)
        outputs[hw] = {"svdlite": runner.run("svdlite"), "diffusers": runner.run("diffusers"),
                       "diffusers_sgm_eps": diffusers_with_sgm_eps(runner)}
    return outputs, n_params


def _decide_phased(phased: bool | None, unfolded: bool, n_params: int) -> bool:
    """Whether the unfolded copy must wait until diffusers' is freed (None: when the free memory cannot hold it)."""
    if not unfolded:
        return False
    if phased is None:
        return benchlib.mem_available() < _third_copy_bytes(n_params)
    return phased


def _third_copy_bytes(n_params: int) -> float:
    return n_params * 4 * 1.15 + 2 * benchlib.GIB  # the unfolded copy plus its load-time temporaries, and headroom


def _time_first_pair(runners: dict, phases: dict, phased: bool, repeats: int, warmup: int, profile: bool,
                     result: dict, log) -> None:
    """diffusers vs svdlite at every size, then diffusers' copy dropped (phased, or no ablation)."""
    if phased:
        need = _third_copy_bytes(result["params_diffusers"])
        log(f"free memory {benchlib.mem_available() / benchlib.GIB:.1f} GiB, {need / benchlib.GIB:.1f} GiB needed "
            "for a third copy: phased run; phase 1: diffusers vs svdlite")
    for hw, runner in runners.items():
        log(f"{hw[0]}x{hw[1]} px:")
        phases[hw].append(benchlib.time_interleaved(runner, PAIR, repeats, warmup, log))
        if profile:
            result.setdefault("profiles", {})[f"{hw[0]}x{hw[1]}"] = profile_calls(runner, PAIR)
    for runner in runners.values():
        runner.drop("diffusers")


def _add_unfolded(folder: str, runners: dict, outputs: dict, log) -> None:
    start = time.perf_counter()
    model = load_unet(folder, fold_cross_attention=False)
    log(f"loaded svdlite unfolded in {time.perf_counter() - start:.1f}s")
    for hw, runner in runners.items():
        runner.add("unfolded", model)
        outputs[hw]["unfolded"] = runner.run("unfolded")


def _equality(hw, outputs: dict, log) -> dict:
    """Every output against svdlite's (folded): max |a - b| / max |svdlite| within TOLERANCE."""
    ref = outputs["svdlite"]
    diffs = {name: benchlib.rel_diff(outputs[name], ref) for name in TOLERANCE if name in outputs}
    eq = {"max_rel_diff_vs_svdlite": diffs, "tolerance": TOLERANCE, "output_max_abs": ref.abs().max().item(),
          "output_shape": list(ref.shape),
          "passed": all(diffs[k] <= TOLERANCE[k] and math.isfinite(diffs[k]) for k in diffs)}
    log(f"{hw[0]}x{hw[1]} equality (max rel diff vs svdlite folded): "
        + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return eq


def _time_the_rest(hw, runner: Runner, phases: list, phased: bool, variants: list, repeats: int, warmup: int,
                   profile: bool, result: dict, log) -> None:
    """Phase 2 of a phased run (svdlite vs unfolded), or all three interleaved; nothing more without the ablation."""
    if phased:
        log(f"phase 2 at {hw[0]}x{hw[1]}: svdlite vs unfolded")
        phases.append(benchlib.time_interleaved(runner, ["svdlite", "unfolded"], repeats, warmup, log))
        if profile:
            result["profiles"][f"{hw[0]}x{hw[1]}"]["unfolded"] = profile_calls(runner, ["unfolded"])["unfolded"]
    elif "unfolded" in variants:
        log(f"{hw[0]}x{hw[1]}: timing all three interleaved: {warmup} warm-up + {repeats} rounds")
        phases.append(benchlib.time_interleaved(runner, variants, repeats, warmup, log))
        if profile:
            result.setdefault("profiles", {})[f"{hw[0]}x{hw[1]}"] = profile_calls(runner, variants)


def _size_row(hw, eq: dict, phases: list, variants: list, macs: int | None, rate: float) -> dict:
    """One size's row: the equality check, per-call seconds, per-round ratios, and the MAC rates where counted."""
    times = {n: [s for ph in phases for s in ph.get(n, [])] for n in variants}
    ratios = {"diffusers/svdlite": []}
    if "unfolded" in variants:
        ratios["unfolded/svdlite"] = []
    for ph in phases:
        for num, key in (("diffusers", "diffusers/svdlite"), ("unfolded", "unfolded/svdlite")):
            if num in ph:
                ratios[key] += [a / b for a, b in zip(ph[num], ph["svdlite"])]
    row = {"height": hw[0], "width": hw[1], "latent": [hw[0] // 8, hw[1] // 8], "equality": eq,
           "seconds_per_call": {n: benchlib.stats(v) for n, v in times.items()},
           "ratios": {k: benchlib.stats(v) for k, v in ratios.items()},
           "svdlite/diffusers": benchlib.stats([b / a for a, b in zip(times["diffusers"], times["svdlite"])]),
           "macs": macs}
    if macs:
        svd_rate = macs / row["seconds_per_call"]["svdlite"]["median"]
        row.update(svdlite_mac_per_s=svd_rate, svdlite_fraction_of_roofline=svd_rate / rate,
                   diffusers_mac_per_s=macs / row["seconds_per_call"]["diffusers"]["median"])
    return row


LABELS = {"unfolded": "svdlite unfolded (fold_cross_attention=False)",
          "diffusers_sgm_eps": "diffusers with the original GroupNorm eps 1e-5",
          "diffusers": "diffusers as shipped (eps 1e-6 in some ResBlocks)"}
NAMES = {"diffusers": "diffusers UNetSpatioTemporalConditionModel", "svdlite": "svdlite VideoUNet (VCUT fold)",
         "unfolded": "svdlite unfolded (ablation)"}


def print_table(r: dict, command: str) -> None:
    """The result of `benchmark` as the tables benchmark.py prints."""
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
    for row in r["sizes"]:
        _print_size(row)
    if "profile" in r:
        for n, table in r["profile"].items():
            print(f"\ntorch.profiler, one call of {n} (top ops by self CPU time):\n{table}")


def _print_size(row: dict) -> None:
    eq = row["equality"]
    print(f"\n{row['height']}x{row['width']} px (latent {row['latent'][0]}x{row['latent'][1]}); output check "
          f"(max |a - svdlite| / max |svdlite|, |svdlite| max {eq['output_max_abs']:.3g}): "
          f"{'PASSED' if eq['passed'] else 'FAILED'}")
    for k, v in eq["max_rel_diff_vs_svdlite"].items():
        print(f"  {LABELS[k]:<50}{v:>10.2e}   (tolerance {eq['tolerance'][k]:.0e})")
    header = f"{'variant':<44}{'median s/call':>14}{'min':>9}{'max':>9}{'n':>4}{'GMAC/s':>9}"
    print(header)
    print("-" * len(header))
    for n, st in row["seconds_per_call"].items():
        rate = f"{row['macs'] / st['median'] / 1e9:>9.1f}" if row["macs"] and n != "unfolded" else ""
        print(f"{NAMES[n]:<44}{st['median']:>14.3f}{st['min']:>9.3f}{st['max']:>9.3f}{st['n']:>4}{rate}")
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


if __name__ == "__main__":
    sys.exit("tools/bench_unet.py is a module of tools/benchmark.py, not a command: "
             "python tools/benchmark.py --parts unet --help")
