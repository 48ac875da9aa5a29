#!/usr/bin/env python3
"""How far and how fast svdlite's approximate options move from the exact output (same seed, same settings).

    python tools/measure_options.py [--model tiny|fullwidth|PATH|PRESET] [--variant NAME:KEY=V,KEY=V ...]
                                    [--f3-ratios 0.1,0.2,...] [--f3-schedule S.json] [--cuts K1,K2,...]
                                    [--speeds balanced,fast] [--rounds R] [--steps N] [--frames N] [--height H]
                                    [--width W] [--seed S] [--image IMG] [--device cpu] [--dtype fp32] [--json]
                                    [--f3-save S.json [--calibrate-only] [--force]]

Every variant is a set of `svdlite.generate` options (guidance_cut_step, f3_ratio, f3_statistic, cache_interval,
cache_depth, schedule, num_inference_steps, speed): one per-step plan (svdlite/plan.py). Each is run with the same
seed and image as the exact run and reported with: the relative L2 distance of its final latents from the exact
ones (||z - z_exact|| / ||z_exact||), the mean and max absolute difference of the uint8 frames, the PSNR of all
frames and of the worst frame, its UNet work (guided + conditional calls, skipped temporal units, cache-reusing
steps), and its time: every round runs the exact computation and every variant once, in turn, and the time ratio
is the median over rounds of variant / exact within a round (whole `generate` calls, decoding included), for wall
time and for the process's CPU time (robust on a shared machine).

F3 variants need a schedule: `--f3-schedule`, or one is calibrated here on the same image with seed + 1 and the
run's settings (so the ranking is not fitted to the measured noise).

Models:
  tiny       the bundled random-weight model (svdlite.load_model("tiny"), its preset's size, frames and steps);
  fullwidth  SVD's full-size networks (UNetConfig(), VAEConfig(), CLIPVisionConfig(), ~2.1B parameters, ~8.5 GB
             fp32) assembled in memory from random weights (svdlite.testing.random_tensors), with the svd-xt
             preset's sampling defaults (guidance 1.5 -> 3.0), at 64x128 pixels, 8 frames, 10 steps by default;
  PATH / preset name   anything svdlite.load_model takes (real weights: this is the measurement that matters).
Random weights say nothing about visual quality; see the caveat the script prints.
"""
import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import svdlite
from svdlite.clip import CLIPVisionConfig, build_image_encoder
from svdlite.components import SVDModel
from svdlite.plan import SPEED_LEVELS, speed_options
from svdlite.run import RunSpec
from svdlite.testing import random_tensors
from svdlite.unet import UNetConfig, VideoUNet
from svdlite.vae import ConditionEncoder, VAEConfig, VideoDecoder
from svdlite.outputs import add_force, check_outputs


EXAMPLE = Path(svdlite.__file__).parent / "assets" / "example.png"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FULLWIDTH_DEFAULTS = {"height": 64, "width": 128, "frames": 8, "steps": 10}
OPTION_TYPES = {"guidance_cut_step": int, "f3_ratio": float, "f3_statistic": str, "cache_interval": int,
                "cache_depth": int, "schedule": str, "num_inference_steps": int, "speed": str}
CAVEAT = (
    "Caveat: {what} These numbers only say how much each option CHANGES the output relative to the exact "
    "computation with the same seed, and how long it takes; they say nothing about whether the video looks better "
    "or worse, and with random weights nothing about visual quality at all (the exact output itself is noise, and "
    "how much an option moves the output depends on the weights, so real models may move more or less). Whether "
    "an option is acceptable is a judgement on real videos, at the real size and frame count, and is one command "
    "for anyone with the weights:\n  {command}")
def fullwidth_model(seed: int = 0, preset: str = "svd-xt") -> SVDModel:
    """SVD's full-size components with random weights (random_tensors, one seed per component), fp32 on the CPU.

    The UNet is svdlite's folded network, so its random `attn2_fold` weights stand in for W_out W_v directly."""
    unet_cfg, vae_cfg, clip_cfg = UNetConfig(), VAEConfig(), CLIPVisionConfig()
    with torch.device("meta"):
        modules = {"unet": VideoUNet(unet_cfg), "vae_encoder": ConditionEncoder(vae_cfg),
                   "vae_decoder": VideoDecoder(vae_cfg), "image_encoder": build_image_encoder(clip_cfg)}
    for i, (name, module) in enumerate(modules.items()):
        shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        module.load_state_dict(random_tensors(shapes, seed + i), strict=True, assign=True)
        left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"{name}: tensors left on the meta device: {left[:5]}")
        module.eval().requires_grad_(False)
    return SVDModel(**modules, vae_config=vae_cfg, clip_config=clip_cfg, preset=preset,
                    source=f"random full-width weights (seed {seed})")


def parse_variant(text: str) -> tuple[str, dict]:
    """"name:key=value,key=value" (or just "key=value,...", named after itself) -> (name, generate options)."""
    name, _, spec = text.rpartition(":") if ":" in text else (text, "", text)
    options = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in OPTION_TYPES:
            raise ValueError(f"variant {text!r}: {item!r} is not KEY=VALUE with KEY in {sorted(OPTION_TYPES)}")
        try:
            options[key] = OPTION_TYPES[key](value)
        except ValueError:
            raise ValueError(f"variant {text!r}: {key} must be {OPTION_TYPES[key].__name__}, got {value!r}") from None
    if not options:
        raise ValueError(f"variant {text!r} sets no option")
    return name, options


def frame_metrics(frames: torch.Tensor, exact: torch.Tensor) -> dict:
    """uint8 (T, H, W, 3) frames against the exact ones: mean/max |diff| and PSNR (all frames; worst frame)."""
    diff = frames.to(torch.int16) - exact.to(torch.int16)
    sq = diff.double().pow(2)
    mse, mse_frames = sq.mean().item(), sq.flatten(1).mean(1)

    def psnr(m: float) -> float:
        return math.inf if m == 0 else 10 * math.log10(255.0 ** 2 / m)

    return {"frames_mean_abs": diff.abs().double().mean().item(), "frames_max_abs": int(diff.abs().max()),
            "psnr_db": psnr(mse), "psnr_worst_frame_db": psnr(mse_frames.max().item())}


def plan_summary(model: SVDModel, spec: RunSpec) -> dict:
    """The variant's plan, as generate builds it (its `RunSpec`, resolved): guided / conditional calls, skipped
    units, reusing steps."""
    plan = spec.resolve(model).plan
    guided = sum(st.guided for st in plan.steps)
    return {"steps": plan.num_steps, "guided_evals": guided, "conditional_evals": plan.num_steps - guided,
            "skipped_temporal_units": sum(len(st.skip_temporal) for st in plan.steps),
            "reuse_steps": sum(st.cache == "reuse" for st in plan.steps)}


def variant_spec(settings: dict, options: dict) -> RunSpec:
    """One variant's `RunSpec` (what generate runs): the run's settings and the variant's options, except that a
    speed level's own step count (`fast`: 10) replaces the run's, as it does for a user who names only the level
    (the run's count is an explicit setting and would otherwise win, measuring e.g. AYS at 25 steps as `fast`).
    The step count is resolved by `speed_options`, as the spec resolves it. Bad options are refused here."""
    resolved = speed_options(options.get("speed", "exact"), {k: v for k, v in options.items() if k != "speed"})
    if "num_inference_steps" in resolved:
        settings = {k: v for k, v in settings.items() if k != "num_inference_steps"}
    return RunSpec.from_options(**settings | options)


def measure(model: SVDModel, image=EXAMPLE, *, variants: list[tuple[str, dict]], steps: int | None = None,
            frames: int | None = None, seed: int = 0, height: int | None = None, width: int | None = None,
            rounds: int = 1, f3_schedule=None, device="cpu", dtype=torch.float32, log=None) -> dict:
    """Run the exact video and every variant `rounds` times in turn with the same seed; one row per variant."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    d = model.sampling
    settings = {"num_inference_steps": steps or d.num_inference_steps, "num_frames": frames or d.num_frames,
                "height": height or d.height, "width": width or d.width}
    if any("f3_ratio" in o for _, o in variants) and f3_schedule is None:
        log("calibrating an F3 schedule (seed + 1) ...")
        f3_schedule = svdlite.calibrate_f3([image], model=model, seed=seed + 1, device=device, dtype=dtype,
                                           progress=False, spec=RunSpec.from_options(**settings))
    variants = [(name, dict(o, f3_schedule=f3_schedule) if "f3_ratio" in o else o) for name, o in variants]
    specs = {name: variant_spec(settings, o) for name, o in variants}  # refuses bad options up front
    summaries = {name: plan_summary(model, spec) for name, spec in specs.items()}
    specs["exact"] = RunSpec.from_options(**settings)
    kwargs = dict(model=model, seed=seed, device=device, dtype=dtype, progress=False)
    runs = [("exact", {})] + variants
    seconds = {name: [] for name, _ in runs}
    cpu = {name: [] for name, _ in runs}
    outputs = {}
    for r in range(rounds):
        for name, _ in runs[r % len(runs):] + runs[:r % len(runs)]:  # rotate who runs first
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[name] = svdlite.generate(image, spec=specs[name], **kwargs)
            seconds[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            log(f"round {r + 1}/{rounds} {name}: {seconds[name][-1]:.1f}s wall, {cpu[name][-1]:.1f}s CPU")
    exact = outputs["exact"]
    ref = exact.latents.double()
    rows = []
    for name, options in variants:
        video = outputs[name]
        rel_l2 = ((video.latents.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        ratios = [v / e for v, e in zip(seconds[name], seconds["exact"])]
        cpu_ratios = [v / e for v, e in zip(cpu[name], cpu["exact"])]
        rows.append({"variant": name, "options": {k: v for k, v in options.items() if k != "f3_schedule"},
                     **summaries[name], "latents_rel_l2": rel_l2, **frame_metrics(video.frames, exact.frames),
                     "seconds": statistics.median(seconds[name]), "time_ratio": statistics.median(ratios),
                     "time_ratios": ratios, "cpu_seconds": statistics.median(cpu[name]),
                     "cpu_ratio": statistics.median(cpu_ratios), "cpu_ratios": cpu_ratios})
    return {"source": model.source, "preset": model.preset, **settings, "seed": seed, "rounds": rounds,
            "min_guidance_scale": d.min_guidance_scale, "max_guidance_scale": d.max_guidance_scale,
            "exact_seconds": statistics.median(seconds["exact"]), "exact_cpu_seconds": statistics.median(cpu["exact"]),
            "load_average": os.getloadavg(), "threads": torch.get_num_threads(), "image": str(image),
            "dtype": str(dtype).replace("torch.", ""), "device": str(device), "rows": rows}


def _fmt_psnr(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2f}"


def print_table(r: dict, command: str, real_command: str, what: str) -> None:
    print(f"command: {command}")
    print(f"model: {r['source']} (preset {r['preset']}: guidance {r['min_guidance_scale']} -> "
          f"{r['max_guidance_scale']} over the frames)")
    print(f"{r['num_frames']} frames, {r['width']}x{r['height']} px (width x height), "
          f"{r['num_inference_steps']} steps, seed {r['seed']}, {r['dtype']} on {r['device']}, image {r['image']}; "
          f"{r['rounds']} round(s), exact run "
          f"{r['exact_seconds']:.1f}s wall / {r['exact_cpu_seconds']:.1f}s CPU (median); load average "
          f"{', '.join(f'{v:.1f}' for v in r['load_average'])}")
    print("every row is compared with the exact run (no option) with the same seed and settings\n")
    header = (f"{'variant':<26}{'steps':>6}{'g+c evals':>10}{'F3 skip':>8}{'reuse':>6}{'CPU ratio':>10}"
              f"{'wall ratio':>11}{'latents rel L2':>16}{'frames max|d|':>14}{'PSNR dB':>9}{'worst frame':>12}")
    print(header)
    print("-" * len(header))
    for row in r["rows"]:
        evals = f"{row['guided_evals']}+{row['conditional_evals']}"
        print(f"{row['variant']:<26}{row['steps']:>6}{evals:>10}{row['skipped_temporal_units']:>8}"
              f"{row['reuse_steps']:>6}{row['cpu_ratio']:>10.3f}{row['time_ratio']:>11.3f}{row['latents_rel_l2']:>16.3e}"
              f"{row['frames_max_abs']:>14d}{_fmt_psnr(row['psnr_db']):>9}{_fmt_psnr(row['psnr_worst_frame_db']):>12}")
    print("\n(g+c evals: guided UNet calls on 2*frames + conditional-only calls on frames; F3 skip: skipped "
          "temporal units of all blocks x steps; reuse: steps that reuse the cached deep features; CPU / wall ratio: "
          "median over the rounds of variant / exact process CPU time (all threads; robust on a shared machine) and "
          "wall time, whole generate calls; frames |d| in uint8 levels.)\n")
    print(CAVEAT.format(what=what, command=real_command))


def default_variants(steps: int, cuts=None, f3_ratios=(0.1, 0.2, 0.3, 0.5), speeds=("balanced", "fast"),
                     caches=((2, 0), (3, 1))) -> list[tuple[str, dict]]:
    """The guidance cut at each K, F3 at each ratio, step caching at each (N, D), and the speed levels."""
    cuts = [round(0.8 * steps)] if cuts is None else cuts
    return ([(f"guidance-cut@{k}", {"guidance_cut_step": k}) for k in cuts]
            + [(f"f3@{r:g}", {"f3_ratio": r}) for r in f3_ratios]
            + [(f"cache N={n} D={d}", {"cache_interval": n, "cache_depth": d}) for n, d in caches]
            + [(f"speed {s}", {"speed": s}) for s in speeds])


def _floats(text: str | None, what: str, kind=float) -> list | None:
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated {kind.__name__}s, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="prints a table (or --json) on stdout; the only file it writes is "
                                            "--f3-save's")
    parser.add_argument("--model", default="tiny", help="tiny | fullwidth | a checkpoint path or preset name")
    parser.add_argument("--steps", type=int, help="default: the preset's (fullwidth: 10)")
    parser.add_argument("--frames", type=int, help="default: the preset's (fullwidth: 8)")
    parser.add_argument("--height", type=int, help="pixels; default: the preset's (fullwidth: 64)")
    parser.add_argument("--width", type=int, help="pixels; default: the preset's (fullwidth: 128)")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:KEY=V,KEY=V with generate options (repeatable); replaces the default set")
    parser.add_argument("--cuts", help="guidance-cut steps K for the default set (default: 80%% of the steps)")
    parser.add_argument("--f3-ratios", help="F3 ratios for the default set (default: 0.1,0.2,0.3,0.5)")
    parser.add_argument("--speeds", help=f"speed levels for the default set (default: balanced,fast; "
                                         f"known: {','.join(SPEED_LEVELS)})")
    parser.add_argument("--f3-schedule", help="F3 schedule to use (default: calibrate one here, seed + 1)")
    parser.add_argument("--f3-save", type=Path,
                        help="also write the F3 schedule used (calibrated here) to this file")
    parser.add_argument("--calibrate-only", action="store_true", help="with --f3-save: only calibrate and save")
    parser.add_argument("--rounds", type=int, default=1, help="timing rounds (each runs exact and every variant)")
    parser.add_argument("--threads", type=int, help="torch threads (1 makes the CPU-time ratio robust to other load: "
                                                     "no thread spins while it waits for a core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image", default=str(EXAMPLE))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON dict")
    add_force(parser)
    return parser


def load(parser: argparse.ArgumentParser, args, dtype: torch.dtype) -> tuple[SVDModel, str]:
    """The model `--model` names, and what the caveat says of its weights."""
    start = time.perf_counter()
    if args.model == "fullwidth":
        if args.device != "cpu" or dtype != torch.float32:
            parser.error("--model fullwidth builds fp32 CPU weights; use --device cpu --dtype fp32")
        model = fullwidth_model(args.seed)
        what = ("this run used RANDOM weights at SVD's full width (UNet, VAE and CLIP of the real sizes, at a small "
                "resolution and few frames and steps so it finishes on a CPU).")
    else:
        model = svdlite.load_model(args.model, device=args.device, dtype=dtype)
        what = ("this run used the bundled tiny model: RANDOM weights at tiny width." if args.model == "tiny" else
                f"this run used the weights in {args.model}; the metrics are still distances to the exact output, "
                "not quality scores.")
    print(f"model ready in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return model, what


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.f3_save is not None:
        check_outputs(parser, [args.f3_save], args.force)
    command = shlex.join([sys.executable, "tools/measure_options.py", *(sys.argv[1:] if argv is None else argv)])
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    size = dict(steps=args.steps, frames=args.frames, height=args.height, width=args.width)
    if args.model == "fullwidth":
        size = {k: v if v is not None else FULLWIDTH_DEFAULTS[k] for k, v in size.items()}
    try:
        if args.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
        if args.variant:
            variants = [parse_variant(v) for v in args.variant]
        else:
            speeds = args.speeds.split(",") if args.speeds else ("balanced", "fast")
            variants = default_variants(size["steps"] or 4, _floats(args.cuts, "--cuts", int),
                                        _floats(args.f3_ratios, "--f3-ratios") or (0.1, 0.2, 0.3, 0.5), speeds)
        schedule = svdlite.F3Schedule.load(args.f3_schedule) if args.f3_schedule else None
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    model, what = load(parser, args, dtype)
    if args.f3_save:
        if schedule is None:
            settings = {"num_inference_steps": size["steps"], "num_frames": size["frames"], "height": size["height"],
                        "width": size["width"]}
            spec = RunSpec.from_options(**{k: v for k, v in settings.items() if v})
            schedule = svdlite.calibrate_f3([args.image], model=model, seed=args.seed + 1, device=args.device,
                                            dtype=dtype, progress=False, spec=spec)
        schedule.save(args.f3_save, overwrite=args.force)  # a temporary file renamed into place
        print(f"wrote {args.f3_save}", file=sys.stderr)
        if args.calibrate_only:
            return 0
    elif args.calibrate_only:
        parser.error("--calibrate-only needs --f3-save PATH")
    try:
        result = measure(model, args.image, variants=variants, seed=args.seed, rounds=args.rounds,
                         f3_schedule=schedule, device=args.device, dtype=dtype, **size)
    except ValueError as e:
        parser.error(str(e))
    real_command = ("python tools/measure_options.py --model ~/models/svd_xt.safetensors --device cuda "
                    "--dtype fp16 --image photo.jpg --rounds 3   (svd-xt defaults: 25 frames, 576x1024, 30 steps; "
                    "or --model svd-xt to download, or a diffusers folder)")
    result["command"] = command
    if args.json:  # strict JSON: an infinite PSNR (identical frames) is written as null
        for row in result["rows"]:
            row.update({k: None for k, v in row.items() if isinstance(v, float) and math.isinf(v)})
        print(json.dumps(result, indent=1))
    else:
        print_table(result, command, real_command, what)
    return 0


if __name__ == "__main__":
    sys.exit(main())
