#!/usr/bin/env python3
"""svdlite against diffusers on the SAME weights: UNet evaluation, loading, whole runs; and VCUT within svdlite.

    python tools/benchmark.py [--parts unet,loading,generate] [--width full|mid|tiny] [--sizes 128x128,256x256]
                              [--frames N] [--repeats R] [--warmup N] [--seed S] [--threads N] [--no-unfolded]
                              [--profile] [--quick] [--json [PATH]]

Parts (`--parts`, default unet):
  unet      one CFG-doubled UNet evaluation: diffusers, svdlite (folded) and svdlite unfolded (ablation), same
            weights, outputs compared, then timed interleaved (tools/bench_unet.py); at each `--sizes` (pixels;
            128x128 and 256x256 are 16x16 and 32x32 latents), with the MACs of the evaluation (tools/count_macs.py,
            full width) beside this machine's fp32 product rates measured in the same run (best of five 2048^3
            products as torch matmul and as a oneDNN 1x1 convolution, the faster being the compute roofline): the
            achieved fraction of the roofline;
  loading   the full-size UNet loaded to float32 and float16 in fresh processes, diffusers from its fp16 folder,
            svdlite from that folder, an original-layout fp16 file and its converted file (tools/bench_loading.py);
  generate  a whole `generate` against `StableVideoDiffusionPipeline`, same image and noise, 14 frames, 128x128,
            3 steps, decoding included, each run a fresh process (tools/bench_generate.py).
`--quick` is a reduced run (tiny width, one size, two rounds, generate at tiny width once) in under three minutes.
`--json PATH` writes the result (an existing PATH is refused unless `--force`; written under a temporary name and
renamed, once before the generate part too, so what was measured survives its failure); `--json` alone prints it
instead of the tables.

This file only dispatches to the parts; what each measures and how (the unet part's variants, equality check,
timing and memory phases; the loading part's page-cache handling) is in their docstrings, and the pieces they
share are in tools/benchlib.py. `--width full` is SVD's network (1.5B parameters, ~6 GB per fp32 copy; the unet
part runs phased when the free memory cannot hold three copies), `--width tiny` the bundled tiny model's network.
"""
import argparse
import importlib.util
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

import bench_generate
import bench_loading
import bench_unet
import benchlib
from svdlite.outputs import add_force, check_outputs, write_text

QUICK = {"sizes": [(128, 128)], "repeats": 2, "warmup": 1, "loading_rounds": 1, "loading_dtypes": ("fp16",)}
PARTS = ("unet", "loading", "generate")
SVD_UNET_PARAMS = 1_524_000_000  # SVD's UNet in diffusers' layout: 1,524,502,442 parameters


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
    parser.add_argument("--width", choices=sorted(bench_unet.WIDTHS),
                        help="network width (default full: SVD's; --quick: tiny)")
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


def check_args(parser: argparse.ArgumentParser, args) -> set[str]:
    """Every refusal before any work (exit 2); fills in what --quick sets; returns the parts to run."""
    if args.json and args.json != "-":
        check_outputs(parser, [Path(args.json)], args.force)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    try:
        args.sizes = parse_sizes(args.sizes) if args.sizes else [(args.height, args.width_px)]
    except ValueError as e:
        parser.error(str(e))
    args.unfolded = not args.no_unfolded
    if args.quick:
        args.sizes, args.repeats, args.warmup, args.unfolded = (QUICK["sizes"], QUICK["repeats"], QUICK["warmup"],
                                                                False)
    args.width = args.width or ("tiny" if args.quick else "full")
    parts = set(args.parts.split(","))
    if not parts or parts - set(PARTS):
        parser.error(f"--parts takes unet, loading and/or generate, got {args.parts!r}")
    if "loading" in parts and importlib.util.find_spec("accelerate") is None:
        parser.error("--parts loading compares against diffusers' recommended loader, which needs accelerate "
                     "(low_cpu_mem_usage): pip install -e '.[bench]'")
    return parts


def run_parts(parser: argparse.ArgumentParser, args, parts: set[str], command: str) -> dict:
    """The result: the unet part's (or the run's threads and load averages), with `loading` and `generate`."""
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "load_average_start": benchlib.loadavg(),
              "sizes": [], "equality": {"passed": True}}
    if "unet" in parts:
        try:
            result = bench_unet.benchmark(bench_unet.WIDTHS[args.width], args.frames, args.sizes[0][0],
                                          args.sizes[0][1], args.repeats, args.warmup, args.seed, args.profile,
                                          workdir=args.workdir, phased=True if args.phased else None,
                                          sizes=args.sizes, unfolded=args.unfolded)
        except ValueError as e:
            parser.error(str(e))
    result["command"] = command
    result["network"] = args.width
    if "loading" in parts:
        with tempfile.TemporaryDirectory(prefix="svdlite-bench-load-", dir=args.workdir) as tmp:
            paths = bench_loading.write_files(Path(tmp), args.seed, benchlib.log)
            result["loading"] = bench_loading.measure_loading(
                paths, QUICK["loading_dtypes"] if args.quick else ("fp32", "fp16"),
                QUICK["loading_rounds"] if args.quick else args.loading_rounds, torch.get_num_threads(),
                SVD_UNET_PARAMS, benchlib.log)
        result["load_average_end"] = benchlib.loadavg()
    if "generate" in parts:
        with tempfile.TemporaryDirectory(prefix="svdlite-bench-gen-", dir=args.workdir) as tmp:
            if args.json and args.json != "-":  # what is measured so far survives a failure of this part
                write_text(args.json, json.dumps(result, indent=1))
            result["generate"] = bench_generate.measure_generate(
                Path(tmp), "tiny" if args.quick else args.generate_width, 1 if args.quick else args.generate_rounds,
                torch.get_num_threads(), args.seed, benchlib.log)
        result["load_average_end"] = benchlib.loadavg()
    return result


def print_tables(result: dict, parts: set[str], command: str) -> None:
    if "unet" in parts:
        bench_unet.print_table(result, command)
    else:
        print(f"command: {command}\nload average at start {result['load_average_start']}, at end "
              f"{result['load_average_end']}; {result['threads']} threads")
    if "loading" in result:
        bench_loading.print_loading(result["loading"])
    if "generate" in result:
        bench_generate.print_generate(result["generate"])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    parts = check_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join([sys.executable, "tools/benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    result = run_parts(parser, args, parts, command)
    if args.json and args.json != "-":
        write_text(args.json, json.dumps(result, indent=1))
    if args.json == "-":
        print(json.dumps(result, indent=1))
    else:
        print_tables(result, parts, command)
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
