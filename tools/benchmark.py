#!/usr/bin/env python3
"""Speed of svdlite's UNet against diffusers' on the SAME weights, and of VCUT (the fold) within svdlite.

    python tools/benchmark.py [--width full|tiny] [--frames N] [--height H] [--width-px W] [--repeats R]
                              [--warmup N] [--seed S] [--profile] [--json]

One CFG-doubled UNet evaluation (batch 2*frames, as every guided sampling step runs it), three ways:
  diffusers   `UNetSpatioTemporalConditionModel.forward` (diffusers as installed, AttnProcessor2_0 / SDPA);
  svdlite     `VideoUNet` as loaded by `load_unet` (cross-attention folded, VCUT), with the context vectors
              computed once outside the timed call, as `svdlite.pipeline.make_denoiser` does;
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

from svdlite.layers import timestep_embedding
from svdlite.loading import load_unet
from svdlite.testing import random_tensors
from svdlite.unet import UNetConfig
from svdlite.unet_keymap import unet_config_from_diffusers

WIDTHS = {
    "full": UNetConfig(),
    # tools/make_tiny_model.py's network: SVD's structure (4 levels, attention on 3) at width 32
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 1, 1, 1), num_head_channels=16, context_dim=64),
}
VARIANTS = ("diffusers", "svdlite", "unfolded")
# max |a - b| / max |svdlite|. The float32 noise floor of these random networks is itself ~5e-5 (measured at tiny
# width: svdlite fp32 vs fp64 4e-5; in fp64 the fold matches the unfolded network to 2e-8, diffusers with the
# original eps matches to float64 noise, diffusers as shipped differs by 7e-5 (its eps)), hence these bounds.
TOLERANCE = {"unfolded": 5e-4, "diffusers_sgm_eps": 5e-4, "diffusers": 1e-3}
GIB = 1024 ** 3


def diffusers_kwargs(config: UNetConfig, frames: int) -> dict:
    """`UNetSpatioTemporalConditionModel` keyword arguments for the network `config` describes."""
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


def build_diffusers_unet(config: UNetConfig, frames: int, seed: int):
    """diffusers' UNet for `config`, built on the meta device and given random_tensors(seed) weights (fp32)."""
    from diffusers import UNetSpatioTemporalConditionModel

    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel(**diffusers_kwargs(config, frames))
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    unet.load_state_dict(random_tensors(shapes, seed), strict=True, assign=True)
    left = [n for n, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"diffusers UNet tensors left on the meta device: {left[:5]}")
    return unet.eval().requires_grad_(False)


def make_inputs(config: UNetConfig, frames: int, height: int, width: int, seed: int) -> dict:
    """One CFG-doubled call: [uncond; cond] videos (uncond context zero, as sgm/diffusers), in both layouts."""
    multiple = 8 * config.latent_downscale
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {multiple} pixels, got {height}x{width}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    g = torch.Generator().manual_seed(seed + 1)
    b, t, h, w = 2, frames, height // 8, width // 8
    sample = torch.randn(b, t, config.in_channels, h, w, generator=g)
    sigma = torch.tensor([3.0, 3.0])
    timestep = 0.25 * sigma.log()
    token = torch.randn(1, 1, config.context_dim, generator=g)
    context = torch.cat([torch.zeros_like(token), token])  # (b, 1, D)
    added_time_ids = torch.tensor([[6.0, 127.0, 0.02]] * b)  # fps_id, motion bucket, noise aug
    dim = config.adm_in_channels // 3
    y = torch.cat([timestep_embedding(added_time_ids[:, i], dim) for i in range(3)], dim=1)
    return {"diffusers": (sample, timestep, context, added_time_ids),
            "svdlite": (sample.flatten(0, 1), timestep.repeat_interleave(t), context.repeat_interleave(t, 0),
                        y.repeat_interleave(t, 0)),
            "frames": t}


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


def benchmark(config: UNetConfig, frames: int = 14, height: int = 64, width: int = 64, repeats: int = 5,
              warmup: int = 1, seed: int = 0, profile: bool = False, log=None, workdir=None,
              phased: bool | None = None) -> dict:
    """Build, check and time the three variants; returns the result dict (`--json` prints it).

    phased: None decides from the free memory; True / False force the phased / all-three run.
    Raises nothing on a failed equality check: `result["equality"]["passed"]` says it (timings still run)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    inputs = make_inputs(config, frames, height, width, seed)
    result = {"config": config.to_dict(), "params_diffusers": None, "frames": frames, "batch": 2 * frames,
              "height": height, "width": width, "latent": [height // 8, width // 8], "repeats": repeats,
              "warmup": warmup, "seed": seed, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_average_start": _loadavg()}
    import diffusers
    result["diffusers_version"] = diffusers.__version__
    runner = Runner(inputs)
    with tempfile.TemporaryDirectory(prefix="svdlite-bench-", dir=workdir) as tmp:
        start = time.perf_counter()
        unet = build_diffusers_unet(config, frames, seed)
        n_params = sum(p.numel() for p in unet.parameters())
        result["params_diffusers"] = n_params
        log(f"built diffusers UNet ({n_params:,} params, random weights seed {seed}) in "
            f"{time.perf_counter() - start:.1f}s; saving to {tmp}")
        unet.save_pretrained(tmp, safe_serialization=True, max_shard_size="100GB")
        runner.add("diffusers", unet)
        del unet
        start = time.perf_counter()
        runner.add("svdlite", load_unet(tmp))
        log(f"loaded svdlite (folded) from the diffusers folder in {time.perf_counter() - start:.1f}s")
        if runner.models["svdlite"].config != config:
            raise AssertionError(f"svdlite read {runner.models['svdlite'].config} from config.json, expected {config}")
        outputs = {"svdlite": runner.run("svdlite"), "diffusers": runner.run("diffusers"),
                   "diffusers_sgm_eps": diffusers_with_sgm_eps(runner)}
        need = n_params * 4 * 1.15 + 2 * GIB  # the unfolded copy plus its load-time temporaries, and headroom
        if phased is None:
            phased = mem_available() < need
        phases = []
        if phased:
            log(f"free memory {mem_available() / GIB:.1f} GiB, {need / GIB:.1f} GiB needed for a third copy: phased run")
            log("phase 1: diffusers vs svdlite")
            phases.append(time_interleaved(runner, ["diffusers", "svdlite"], repeats, warmup, log))
            if profile:
                result["profile"] = profile_calls(runner, ["diffusers", "svdlite"])
            runner.drop("diffusers")
        start = time.perf_counter()
        runner.add("unfolded", load_unet(tmp, fold_cross_attention=False))
        log(f"loaded svdlite unfolded in {time.perf_counter() - start:.1f}s")
    outputs["unfolded"] = runner.run("unfolded")
    ref = outputs["svdlite"]
    diffs = {name: rel_diff(outputs[name], ref) for name in ("unfolded", "diffusers_sgm_eps", "diffusers")}
    result["equality"] = {"max_rel_diff_vs_svdlite": diffs, "tolerance": TOLERANCE,
                          "output_max_abs": ref.abs().max().item(), "output_shape": list(ref.shape),
                          "passed": all(diffs[k] <= TOLERANCE[k] and math.isfinite(diffs[k]) for k in diffs)}
    log("equality (max rel diff vs svdlite folded): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    if phased:
        log("phase 2: svdlite vs unfolded")
        phases.append(time_interleaved(runner, ["svdlite", "unfolded"], repeats, warmup, log))
        if profile:
            result["profile"]["unfolded"] = profile_calls(runner, ["unfolded"])["unfolded"]
    else:
        log(f"timing all three interleaved: {warmup} warm-up + {repeats} rounds")
        phases.append(time_interleaved(runner, list(VARIANTS), repeats, warmup, log))
        if profile:
            result["profile"] = profile_calls(runner, list(VARIANTS))
    result["memory_mode"] = "phased" if phased else "all three loaded"
    result["load_average_end"] = _loadavg()
    times = {n: [s for ph in phases for s in ph.get(n, [])] for n in VARIANTS}
    result["seconds_per_call"] = {n: _stats(v) for n, v in times.items()}
    ratios = {"diffusers/svdlite": [], "unfolded/svdlite": []}
    for ph in phases:
        for num, key in (("diffusers", "diffusers/svdlite"), ("unfolded", "unfolded/svdlite")):
            if num in ph:
                ratios[key] += [a / b for a, b in zip(ph[num], ph["svdlite"])]
    result["ratios"] = {k: _stats(v) for k, v in ratios.items()}
    return result


def print_table(r: dict, command: str) -> None:
    cfg = r["config"]
    print(f"command: {command}")
    print(f"UNet, one CFG-doubled evaluation: batch {r['batch']} (2 x {r['frames']} frames), {r['height']}x{r['width']} px "
          f"(latent {r['latent'][0]}x{r['latent'][1]}), fp32 CPU, {r['threads']} threads")
    print(f"network: model_channels {cfg['model_channels']}, channel_mult {tuple(cfg['channel_mult'])} "
          f"({r['params_diffusers']:,} params in diffusers' layout); same random weights (seed {r['seed']}) in all three")
    print(f"torch {r['torch']}, diffusers {r['diffusers_version']}; {r['warmup']} warm-up call(s), {r['repeats']} "
          f"interleaved rounds; memory: {r['memory_mode']}")
    print(f"load average (1/5/15 min) at start {r['load_average_start']}, at end {r['load_average_end']} "
          f"(> {r['threads']} means other processes competed for the cores)\n")
    eq = r["equality"]
    print(f"output check (max |a - svdlite| / max |svdlite|, |svdlite| max {eq['output_max_abs']:.3g}): "
          f"{'PASSED' if eq['passed'] else 'FAILED'}")
    labels = {"unfolded": "svdlite unfolded (fold_cross_attention=False)",
              "diffusers_sgm_eps": "diffusers with the original GroupNorm eps 1e-5",
              "diffusers": "diffusers as shipped (eps 1e-6 in some ResBlocks)"}
    for k, v in eq["max_rel_diff_vs_svdlite"].items():
        print(f"  {labels[k]:<50}{v:>10.2e}   (tolerance {eq['tolerance'][k]:.0e})")
    print()
    header = f"{'variant':<44}{'median s/call':>14}{'min':>9}{'max':>9}{'n':>4}"
    print(header)
    print("-" * len(header))
    names = {"diffusers": "diffusers UNetSpatioTemporalConditionModel", "svdlite": "svdlite VideoUNet (VCUT fold)",
             "unfolded": "svdlite unfolded (ablation)"}
    for n in VARIANTS:
        s = r["seconds_per_call"][n]
        print(f"{names[n]:<44}{s['median']:>14.3f}{s['min']:>9.3f}{s['max']:>9.3f}{s['n']:>4}")
    print()
    header = f"{'ratio (per round, same round)':<44}{'median':>14}{'min':>9}{'max':>9}"
    print(header)
    print("-" * len(header))
    for k, s in r["ratios"].items():
        meaning = " (>1: svdlite faster)" if k.startswith("diffusers") else " (>1: fold faster)"
        print(f"{k + meaning:<44}{s['median']:>14.3f}{s['min']:>9.3f}{s['max']:>9.3f}")
    if "profile" in r:
        for n, table in r["profile"].items():
            print(f"\ntorch.profiler, one call of {n} (top ops by self CPU time):\n{table}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", choices=sorted(WIDTHS), default="full", help="network width (default full: SVD's)")
    parser.add_argument("--frames", type=int, default=14)
    parser.add_argument("--height", type=int, default=64, help="pixels (latent = /8)")
    parser.add_argument("--width-px", type=int, default=64, help="pixels (latent = /8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="add torch.profiler top-op tables")
    parser.add_argument("--phased", action="store_true",
                        help="never hold three models at once (automatic when memory is short)")
    parser.add_argument("--workdir", help="where the temporary diffusers folder goes (default: the system temp dir)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON dict")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join([sys.executable, "tools/benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        result = benchmark(WIDTHS[args.width], args.frames, args.height, args.width_px, args.repeats, args.warmup,
                           args.seed, args.profile, workdir=args.workdir, phased=True if args.phased else None)
    except ValueError as e:
        parser.error(str(e))
    result["command"] = command
    result["network"] = args.width
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result, command)
    if not result["equality"]["passed"]:
        print("ERROR: the three variants do not compute the same function; the timings compare different programs",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
