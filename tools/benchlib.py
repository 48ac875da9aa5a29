"""The pieces the benchmark scripts share (tools/benchmark.py, bench_unet.py, bench_loading.py, bench_generate.py).

A library module, not a command: the scripts import it as `import benchlib` (Python looks in a script's own
folder first when it runs as `python tools/<script>.py`). It imports nothing from the other tools.
  log                  a progress line on stderr
  mem_available        the kernel's MemAvailable
  peak_rss             this process's peak resident memory (VmHWM)
  loadavg              the 1/5/15-minute load averages
  stats                median / min / max / n of a list of timings
  time_interleaved     warm-up calls, then rounds calling every variant once, the order rotating
  product_rates        this machine's fp32 rate of one large product, as a GEMM and as a 1x1 convolution
  build_diffusers_unet diffusers' UNet with random weights (the `test` extra)
  rel_diff             max |a - ref| / max |ref|
  child_env            the environment of a child process that must import svdlite from this checkout
"""
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

GIB = 1024 ** 3
REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    """A progress line on stderr (stdout holds the tables or the JSON)."""
    print(msg, file=sys.stderr, flush=True)


def mem_available() -> int:
    """Bytes the kernel reports as available (MemAvailable), or a large number where /proc is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, which belongs to the process image (reset by exec).
    (`getrusage().ru_maxrss` is not: Linux carries it over from the forking parent, so a child started by a big
    benchmark process would report the parent's size.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: the best there is


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages: another busy process on this 2-core machine distorts the timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "all": values}


def time_interleaved(runner, names, repeats: int, warmup: int, log=log) -> dict[str, list[float]]:
    """{name: [seconds per round]}: warm-up calls, then `repeats` rounds calling every variant once, rotating.
    runner: anything with `.run(name)` (bench_unet.Runner)."""
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


def build_diffusers_unet(config, frames: int, seed: int):
    """diffusers' UNet for `config` (svdlite.unet.UNetConfig), built on the meta device and given
    svdlite.testing.random_tensors(seed) weights (fp32). Needs diffusers (the `test` extra)."""
    from diffusers import UNetSpatioTemporalConditionModel

    from svdlite.testing import random_tensors
    from svdlite.unet_keymap import diffusers_unet_params

    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel(**diffusers_unet_params(config, frames))
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    unet.load_state_dict(random_tensors(shapes, seed), strict=True, assign=True)
    left = [n for n, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"diffusers UNet tensors left on the meta device: {left[:5]}")
    return unet.eval().requires_grad_(False)


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|, in float64."""
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def child_env() -> dict:
    """This environment with the repository first on PYTHONPATH: a child script imports svdlite from this checkout
    even where it is not installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


if __name__ == "__main__":
    sys.exit("tools/benchlib.py is the benchmarks' shared module, not a command: python tools/benchmark.py --help")
