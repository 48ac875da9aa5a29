#!/usr/bin/env python3
"""Loading the UNet until it is ready to run, svdlite against diffusers, each load in a fresh process.

Used by tools/benchmark.py (`--loading`); run alone as `python tools/bench_loading.py --child ...` it is the child
that performs one load and prints one JSON line. The files are written once from the same random weights:
  diffusers   a diffusers folder, `unet/diffusion_pytorch_model.fp16.safetensors` + config.json (save_pretrained);
  original    the same tensors in the original single-file layout (`model.diffusion_model.*`), fp16;
  svdlite     svdlite's converted file from the original one (tools/convert_weights.py, fp16);
  svdlite32   the same converted to fp32 (`--dtype fp32`), the file to run a float32 model from.
diffusers loads only its folder (`UNetSpatioTemporalConditionModel.from_pretrained(variant="fp16")`, with
`low_cpu_mem_usage`, which needs `accelerate`: the `bench` extra); svdlite loads all four (`load_unet`). Before
each load the other files are dropped from the page cache and this one is read through, so every load, on either
side, reads a cached file with the same free memory beside it; the cases alternate, each in its own process.
Reported per load: seconds inside the load call (imports excluded), the process's peak resident memory, its
resident memory before the call, and the model's bytes.

    python tools/bench_loading.py --write-files FOLDER [--seed S] [--force]
    python tools/bench_loading.py --child diffusers|svdlite PATH fp32|fp16 [--threads N]

--write-files writes FOLDER/diffusers/, FOLDER/svd_original_fp16.safetensors, FOLDER/svd.svdlite.safetensors and
FOLDER/svd.svdlite.fp32.safetensors into an existing FOLDER; any of them that exists is refused unless --force, and
each is written under a temporary name beside it and renamed when complete. --child writes no file.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import benchlib
from svdlite.outputs import add_force, atomic_file, atomic_folder, check_outputs


DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
CASES = (("diffusers", "diffusers"), ("svdlite", "diffusers"), ("svdlite", "original"), ("svdlite", "svdlite"),
         ("svdlite", "svdlite32"))
PEAK_FACTOR = {"diffusers": 1.7, "svdlite": 1.15}  # measured peak / model size, to wait for enough free memory


def child(side: str, path: str, dtype: str, threads: int) -> dict:
    """One load in this (fresh) process; returns the measurement."""
    torch.set_num_threads(threads)
    if side == "diffusers":
        from diffusers import UNetSpatioTemporalConditionModel
    else:
        from svdlite.loading import load_unet
    base = benchlib.peak_rss()
    start = time.perf_counter()
    if side == "diffusers":
        model = UNetSpatioTemporalConditionModel.from_pretrained(path, subfolder="unet", variant="fp16",
                                                                 torch_dtype=DTYPES[dtype], low_cpu_mem_usage=True)
    else:
        model = load_unet(path, dtype=DTYPES[dtype])
    seconds = time.perf_counter() - start
    peak = benchlib.peak_rss()
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    left = [n for n, t in model.state_dict().items() if t.is_meta or t.dtype != DTYPES[dtype]]
    if left:
        raise RuntimeError(f"{side}: not loaded as {dtype}: {left[:3]}")
    return {"seconds": seconds, "peak_rss": peak, "rss_before": base, "model_bytes": model_bytes}


def write_files(folder: Path, seed: int, log) -> dict[str, Path]:
    """The three files from one set of random weights, written by a child process (whose freed memory would
    otherwise stay with this one while the loads run)."""
    cmd = [sys.executable, __file__, "--write-files", str(folder), "--seed", str(seed)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=benchlib.child_env())
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    log(f"wrote the loading benchmark's files to {folder}")
    return file_paths(folder)


def file_paths(folder: Path) -> dict[str, Path]:
    return {"diffusers": folder / "diffusers", "original": folder / "svd_original_fp16.safetensors",
            "svdlite": folder / "svd.svdlite.safetensors", "svdlite32": folder / "svd.svdlite.fp32.safetensors"}


def _write_files(folder: Path, seed: int, force: bool = False) -> None:
    """The files (see the module docstring), SVD's full-size UNet; each through a temporary name."""
    from safetensors.torch import save_file

    from svdlite.components import open_model_source
    from svdlite.convert import convert
    from svdlite.unet import UNetConfig, VideoUNet
    from svdlite.unet_keymap import ORIGINAL_PREFIX, diffusers_unet_names

    config, paths = UNetConfig(), file_paths(folder)
    unet = benchlib.build_diffusers_unet(config, 14, seed).half()
    with atomic_folder(paths["diffusers"]) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True, variant="fp16", max_shard_size="100GB")
    with torch.device("meta"):
        keys = list(VideoUNet(config, fold_cross_attention=False).state_dict())
    state = unet.state_dict()
    with atomic_file(paths["original"]) as tmp:
        save_file({ORIGINAL_PREFIX + k: state[v].contiguous() for k, v in diffusers_unet_names(config, keys).items()},
                  str(tmp))
    del unet, state
    for fmt, dtype in (("svdlite", torch.float16), ("svdlite32", torch.float32)):
        convert(open_model_source(paths["original"], "svd", require_all=False), paths[fmt], dtype=dtype,
                force=force, log=lambda msg: None)  # convert writes through a temporary file itself


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def _evict(paths) -> None:
    """Drop these files' pages from the page cache (POSIX_FADV_DONTNEED; they are clean, so no root is needed):
    otherwise the benchmark's other files (14.6 GB together) fill the memory a float32 load must first-touch, and
    each load's time depends on how much cache the kernel has to reclaim on the way (measured: 4.6-13.2 s for the
    same load in one run)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for f in (f for path in paths for f in _files(path)):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_through(path: Path) -> None:
    """Read every byte once, so the page cache holds the file for both sides."""
    for f in _files(path):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def run_child(side: str, path: Path, dtype: str, threads: int, model_bytes: int, log, others=()) -> dict:
    need = PEAK_FACTOR[side] * model_bytes + (1 << 30)
    while benchlib.mem_available() < need:  # other processes hold the memory: wait rather than risk the OOM killer
        log(f"  waiting: {benchlib.mem_available() / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed")
        time.sleep(10)
    _evict(others)  # only this load's file stays cached: the same free memory for every load
    _read_through(path)  # the files together may not fit in the page cache: this one is in it for this load
    cmd = [sys.executable, __file__, "--child", side, str(path), dtype, "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=benchlib.child_env())
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_loading(paths: dict[str, Path], dtypes=("fp32", "fp16"), rounds: int = 3, threads: int = 2,
                    params: int = 1_500_000_000, log=print) -> dict:
    """{dtype: {case: {seconds: stats, peak_rss: stats, ...}}, ratios: {dtype: {case: stats}}}; cases alternate."""
    result = {}
    for dtype in dtypes:
        model_bytes = params * DTYPES[dtype].itemsize
        runs = {f"{s}:{f}": [] for s, f in CASES}
        for r in range(rounds):
            order = CASES[r % len(CASES):] + CASES[:r % len(CASES)]
            for side, fmt in order:
                m = run_child(side, paths[fmt], dtype, threads, model_bytes, log,
                              [p for f, p in paths.items() if f != fmt])
                runs[f"{side}:{fmt}"].append(m)
            log(f"  loading {dtype} round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {v[-1]['seconds']:.2f}s" for k, v in runs.items()))
        out = {}
        for case, ms in runs.items():
            ref = runs["diffusers:diffusers"]
            out[case] = {
                "seconds": statistics.median(m["seconds"] for m in ms),
                "seconds_all": [m["seconds"] for m in ms],
                "peak_rss": max(m["peak_rss"] for m in ms), "rss_before": min(m["rss_before"] for m in ms),
                "model_bytes": ms[0]["model_bytes"],
                "ratio_vs_diffusers": statistics.median(a["seconds"] / b["seconds"] for a, b in zip(ms, ref)),
            }
            o = out[case]
            o["peak_over_model"] = o["peak_rss"] / o["model_bytes"]
            o["peak_above_start_over_model"] = (o["peak_rss"] - o["rss_before"]) / o["model_bytes"]
        result[dtype] = out
    return result


def print_loading(result: dict) -> None:
    print("\nloading the full-size UNet until ready, each load a fresh process (median seconds; ratio = median of "
          "per-round svdlite/diffusers-folder; peak = max resident memory over the rounds)")
    header = (f"{'side: from':<22}{'dtype':>6}{'seconds':>9}{'ratio':>8}{'peak GiB':>10}{'model GiB':>11}"
              f"{'peak/model':>12}{'(peak-start)/model':>20}")
    print(header)
    print("-" * len(header))
    for dtype, cases in result.items():
        for case, o in cases.items():
            print(f"{case:<22}{dtype:>6}{o['seconds']:>9.2f}{o['ratio_vs_diffusers']:>8.2f}"
                  f"{o['peak_rss'] / 2**30:>10.2f}{o['model_bytes'] / 2**30:>11.2f}{o['peak_over_model']:>12.2f}"
                  f"{o['peak_above_start_over_model']:>20.2f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="run by tools/benchmark.py --parts loading; exit code 2: refused (bad "
                                            "arguments, an output exists without --force)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write-files", metavar="FOLDER", type=Path,
                      help="write the benchmark's files from one set of random weights into FOLDER (it must exist)")
    mode.add_argument("--child", nargs=3, metavar=("SIDE", "PATH", "DTYPE"),
                      help="one load: SIDE diffusers or svdlite loads PATH to DTYPE fp32 or fp16 and prints the "
                           "measurement as one JSON line")
    parser.add_argument("--seed", type=int, default=0, help="--write-files: seed of the random weights")
    parser.add_argument("--threads", type=int, default=2, help="--child: torch threads")
    add_force(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.write_files:
        if not args.write_files.is_dir():
            parser.error(f"--write-files: folder {args.write_files} does not exist")
        check_outputs(parser, file_paths(args.write_files).values(), args.force)
        _write_files(args.write_files, args.seed, args.force)
        return 0
    side, path, dtype = args.child
    if side not in ("diffusers", "svdlite") or dtype not in DTYPES:
        parser.error(f"--child SIDE PATH DTYPE: SIDE diffusers or svdlite, DTYPE {' or '.join(DTYPES)}")
    print(json.dumps(child(side, path, dtype, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
