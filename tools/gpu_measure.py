"""The GPU check's measuring pieces (tools/gpu_check.py): output comparisons, float32 without TF32, timing on a device,
peak device memory and the device's matmul rate.

A library module, not a command: tools/gpu_check.py imports it as `import gpu_measure` (Python looks in a script's
own folder first). It imports nothing from the other tools but tools/benchlib.py.
  rel_err, rel_l2, psnr, finite   comparisons of an output against a reference (on the CPU, in float64)
  sync, free                      wait for the device; collect garbage and empty the CUDA cache
  exact_fp32                      TF32 off for matmuls and cuDNN convolutions inside the block
  Clock, alternate                seconds of one call (CUDA events or synchronize + wall clock); alternated rounds
  peak_memory, param_bytes        torch.cuda.max_memory_allocated above the resident bytes; a module's weight bytes
  matmul_peak                     TFLOP/s of one n^3 product per dtype, measured here
"""
import contextlib
import gc
import math
import sys
import time

import numpy as np
import torch

import benchlib


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (the tests' rel_err), both moved to the CPU first."""
    return benchlib.rel_diff(a.detach().cpu(), ref.detach().cpu())


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return (torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all().item())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def exact_fp32():
    """float32 as float32: TF32 off for matmuls and cuDNN convolutions (torch's default lets cuDNN convolutions use
    TF32, ~1e-3 relative), restored afterwards."""
    new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")
    if new_api:
        old = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    else:
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        if new_api:
            torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = old
        else:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class Clock:
    """Seconds of one call: CUDA events on a GPU (`whole=False`), else (or for a whole run with host work)
    synchronize + wall clock."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn, whole: bool = False):
        if self.device.type == "cuda" and not whole:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0, out
        sync(self.device)
        t0 = time.perf_counter()
        out = fn()
        sync(self.device)
        return time.perf_counter() - t0, out


def alternate(calls: dict, clock: Clock, warmup: int, rounds: int, log, whole: bool = False) -> dict:
    """{name: [seconds per round]}: `warmup` calls of each, then `rounds` rounds calling each once, the order
    rotating from round to round. (benchlib.time_interleaved is the same loop on the host's wall clock alone; a
    GPU call needs the device clock.)"""
    names = list(calls)
    with torch.no_grad():
        for _ in range(warmup):
            for name in names:
                clock(calls[name], whole)
        times = {n: [] for n in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(clock(calls[name], whole)[0])
            log(f"    round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.4f}s" for n in names))
    return times


def peak_memory(device: torch.device, fn) -> tuple[dict | None, object]:
    """({"resident": bytes allocated before, "peak": max_memory_allocated, "above_resident"}, fn()) on a GPU;
    (None, fn()) elsewhere."""
    if device.type != "cuda":
        return None, fn()
    sync(device)
    free(device)
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"resident": resident, "peak": peak, "above_resident": peak - resident}, out


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def matmul_peak(device: torch.device, n: int, dtypes, warmup: int = 3, reps: int = 10) -> dict:
    """TFLOP/s of one n x n x n product per dtype, measured here: random operands, `warmup` products, then the mean
    of `reps` timed ones (CUDA events around all of them, or the wall clock on the CPU)."""
    out = {}
    clock = Clock(device)
    g = torch.Generator(device=device).manual_seed(0)
    for dtype in dtypes:
        a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        for _ in range(warmup):
            a @ b
        seconds, _ = clock(lambda: [a @ b for _ in range(reps)])
        out[str(dtype).removeprefix("torch.")] = {"n": n, "seconds_per_product": seconds / reps,
                                                  "tflops": 2 * n ** 3 / (seconds / reps) / 1e12}
    free(device)
    return out


if __name__ == "__main__":
    sys.exit("tools/gpu_measure.py is a module of tools/gpu_check.py, not a command: python tools/gpu_check.py --help")
