#!/usr/bin/env python3
"""Everything a CUDA GPU must show of svdlite, in one command: fidelity, half precision, speed and memory.

    python tools/gpu_check.py [--device cuda] [--parts P,...] [--budget-s S] [--reference DIR] [--json PATH] [--force]
    python tools/gpu_check.py --device cpu --quick [--json PATH]          # tiny width, every part but compile

Random weights, no Hub: one diffusers SVD pipeline (UNetSpatioTemporalConditionModel, AutoencoderKLTemporalDecoder,
CLIPVisionModelWithProjection) is built on the meta device and given svdlite.testing.random_tensors weights (seeded;
diffusers' own init zeroes mix factors and projections, which would hide mistakes), stored as fp16 files in a
temporary diffusers folder as the released checkpoints ship, and kept in memory in float16. svdlite loads that
folder through its own loader, so both sides run the very same weights. Full width is SVD's network (1.5B UNet
parameters, ViT-H/14, the 4-level VAE); `--quick` uses a tiny network of the same structure.

Parts, in this order (`--parts` takes a comma-separated subset; all by default, `--quick`: all but compile):
  fidelity  float32 on the device, TF32 off: the reference checks of tests/ against the stored sgm tensors of
            `--reference` (the tiny UNet's three cases and every block, the temporal VAE decoder's two cases, every
            block and decode_latents, the encoder and quant_conv, the whole 5-step sampling run: each step's state,
            network output and denoised estimate, the final latent and decoded video), with the tests' tolerances
            (atol = rtol = 1e-4, or 1e-4 relative to the reference's largest value); then one guided evaluation of
            the full-width UNet on the device against the same evaluation on the CPU in float32;
  half      float16 and bfloat16 against float32 (on the device, TF32 off): the same full-width evaluation, and a
            short `generate` (final latents: relative L2; uint8 frames: PSNR); every output checked finite;
  speed_unet      one guided UNet evaluation at SVD-XT's real size (2 x 25 frames, 72x128 latents) in float16,
            svdlite (context vectors computed once outside the call, as generate does) against diffusers,
            alternated rounds, median; MACs counted on the meta device (torch FlopCounterMode; diffusers' own
            computation counted as svdlite's unfolded network, the same products); achieved TFLOP/s against the
            device's peak, taken from an 8192^3 float16 / bfloat16 matmul measured in the same run;
  speed_generate  a whole run at 1024x576, 25 frames, 3 steps, decoding included, svdlite `generate` against
            `StableVideoDiffusionPipeline`, same image, noise and settings, float16, alternated rounds;
  memory    torch.cuda.max_memory_allocated of the UNet evaluation (above the resident weights and inputs) and of a
            whole run at SVD-XT's default settings (25 frames, 30 steps, 1024x576, decode chunk 14), each side alone
            on the device;
  levels    `generate(speed=...)` for exact, balanced and fast at SVD-XT's default settings, timed;
  compile   the UNet evaluation of speed_unet with each implementation's forward under torch.compile (default
            mode): compile time (first call), then eager and compiled alternated.
Each part times itself, catches its own exception (recorded with its traceback; the other parts still run) and
records checks with their limits. A part is skipped when the time since the start plus its full-size estimate
exceeds `--budget-s` (default 480 s). Timing: warm-up calls, then alternated rounds; CUDA events around one UNet
evaluation, torch.cuda.synchronize and a wall clock around a whole run.

Exit codes: 0 every part ran and every check passed; 1 a part failed or a check did not pass; 2 refused (bad
arguments, --json PATH exists without --force).
"""
import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from svdlite.outputs import add_force, check_outputs, write_text
from svdlite.testing import block_outputs, unet_call_inputs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = ROOT / "tests" / "reference"
PARTS = ("fidelity", "half", "speed_unet", "speed_generate", "memory", "levels", "compile")
# seconds each part took, measured at full width on one H100/H200-class GPU or estimated from its work where not yet
# measured: a part starts only if the elapsed time plus this fits in --budget-s
ESTIMATE_S = {"fidelity": 40, "half": 60, "speed_unet": 30, "speed_generate": 50, "memory": 45, "levels": 45,
              "compile": 240}
# The tests' tolerances (tests/test_unet_reference.py, test_vae.py: atol = rtol = 1e-4; test_pipeline_reference.py:
# max |a - b| / max |ref| < 1e-4), applied here on the device in float32 with TF32 off.
REF_ATOL = REF_RTOL = 1e-4
REF_REL = 1e-4
# full-width UNet, device float32 against CPU float32: max |a - b| / max |cpu|. tools/benchmark.py measured the float32
# noise floor of these random networks at ~5e-5 and bounds reordered-but-equal computations at 5e-4.
CPU_DEVICE_REL = 5e-4
# Half precision against float32: bounds for gross errors (a wrong cast, an overflow), not accuracy targets; the
# measured values are in the JSON. fp16 keeps 11 significant bits, bf16 8.
HALF_LIMITS = {"float16": {"eval_rel_l2": 2e-2, "latents_rel_l2": 5e-2, "frames_psnr_db": 25.0},
               "bfloat16": {"eval_rel_l2": 1e-1, "latents_rel_l2": 2e-1, "frames_psnr_db": 15.0}}
# svdlite against diffusers in float16 on the same weights: diffusers' GroupNorm eps 1e-6 in some ResBlocks (1e-5 in
# the original and svdlite) and float16 rounding in different places; a bound for "the same function"
SAME_FUNCTION_REL = 5e-2

# SVD-XT's default run (svdlite.presets "svd-xt") and the sizes of each mode
XT = dict(num_frames=25, num_inference_steps=30, height=576, width=1024, decode_chunk_size=14, fps=7,
          motion_bucket_id=127, noise_aug_strength=0.02, min_guidance_scale=1.5, max_guidance_scale=3.0)
SIZES = {
    "full": dict(eval_frames=14, eval_px=(192, 256), half_gen=dict(num_frames=14, num_inference_steps=4,
                                                                    height=320, width=512, decode_chunk_size=14),
                 unet_frames=25, unet_px=(576, 1024), warmup=2, rounds=5,
                 gen=dict(num_frames=25, num_inference_steps=3, height=576, width=1024, decode_chunk_size=14),
                 gen_rounds=2, default=dict(XT), levels_size=dict(num_frames=25, height=576, width=1024,
                                                                  decode_chunk_size=14),
                 matmul_n=8192),
    "quick": dict(eval_frames=6, eval_px=(128, 128), half_gen=dict(num_frames=6, num_inference_steps=2, height=64,
                                                                    width=128, decode_chunk_size=6),
                  unet_frames=6, unet_px=(128, 128), warmup=1, rounds=2,
                  gen=dict(num_frames=6, num_inference_steps=2, height=64, width=128, decode_chunk_size=6),
                  gen_rounds=1, default=dict(XT, num_frames=6, num_inference_steps=3, height=64, width=128,
                                             decode_chunk_size=6),
                  levels_size=dict(num_frames=6, height=64, width=128, decode_chunk_size=6), matmul_n=512),
}
# SVD's scheduler/scheduler_config.json (as tools/bench_generate.py); DDPM-only keys left out
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="v_prediction", interpolation_type="linear", use_karras_sigmas=True, sigma_min=0.002,
                 sigma_max=700.0, timestep_spacing="leading", timestep_type="continuous", steps_offset=1)
GIB = 2 ** 30


# ------------------------------------------------------------------------------------------------ helpers


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (the tests' rel_err)."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return (torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()


def close_ratio(a: torch.Tensor, ref: torch.Tensor, atol: float = REF_ATOL, rtol: float = REF_RTOL) -> float:
    """max |a - ref| / (atol + rtol |ref|): torch.testing.assert_close passes exactly when this is <= 1."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    if a.shape != ref.shape:
        raise ValueError(f"shape {tuple(a.shape)} against the reference's {tuple(ref.shape)}")
    return ((a - ref).abs() / (atol + rtol * ref.abs())).max().item()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all().item())


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "all": values}


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
    rotating from round to round."""
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


# ------------------------------------------------------------------------------------------------ the weights


def _random_module(cls, kwargs: dict, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    """`cls(**kwargs)` built on the meta device, every state-dict tensor from random_tensors(seed) in `dtype`."""
    from svdlite.testing import random_tensors

    with torch.device("meta"):
        module = cls(**kwargs) if not isinstance(kwargs, tuple) else cls(*kwargs)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    module.load_state_dict(random_tensors(shapes, seed, dtype), strict=True, assign=True)
    for name, buf in list(module.named_buffers()):
        if buf.is_meta and name.endswith("position_ids"):  # transformers' CLIP: arange, not in the state dict
            owner = module.get_submodule(name.rpartition(".")[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(tuple(buf.shape)),
                                  persistent=False)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{cls.__name__}: tensors left on the meta device: {left[:5]}")
    return module.eval().requires_grad_(False)


def build_pipeline(width: str, seed: int, num_frames: int = 25):
    """A diffusers StableVideoDiffusionPipeline at SVD's width ("full") or tiny width, every tensor random (float16,
    as the released checkpoints ship), on the CPU. num_frames: the UNet config's default (25: SVD-XT's)."""
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                           UNetSpatioTemporalConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # not the info lines of every CPU-generator draw

    if width == "full":
        unet_kwargs = dict(num_frames=num_frames)  # diffusers' defaults are SVD's network
        vae_kwargs = dict(down_block_types=("DownEncoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                          layers_per_block=2, latent_channels=4)  # SVD's vae/config.json
        clip = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
                                num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu",
                                layer_norm_eps=1e-5)
    else:  # tools/bench_generate.py's tiny pipeline: SVD's structure at width 32
        unet_kwargs = dict(sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 32, 64, 64),
                           num_attention_heads=(2, 2, 4, 4), layers_per_block=1, transformer_layers_per_block=1,
                           cross_attention_dim=48, addition_time_embed_dim=256,
                           projection_class_embeddings_input_dim=768, num_frames=num_frames)
        vae_kwargs = dict(down_block_types=("DownEncoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64),
                          layers_per_block=2, latent_channels=4, sample_size=64)
        clip = CLIPVisionConfig(hidden_size=32, intermediate_size=128, projection_dim=48, num_hidden_layers=2,
                                num_attention_heads=4, image_size=224, patch_size=14, hidden_act="gelu",
                                layer_norm_eps=1e-5)
    f16 = torch.float16
    unet = _random_module(UNetSpatioTemporalConditionModel, unet_kwargs, seed + 1000, f16)
    vae = _random_module(AutoencoderKLTemporalDecoder, vae_kwargs, seed + 1001, f16)
    image_encoder = _random_module(CLIPVisionModelWithProjection, (clip,), seed + 1002, f16)
    return StableVideoDiffusionPipeline(vae=vae, image_encoder=image_encoder, unet=unet,
                                        scheduler=EulerDiscreteScheduler(**SCHEDULER),
                                        feature_extractor=CLIPImageProcessor())


def make_image(height: int, width: int):
    """A smooth colour gradient with noise (tools/bench_generate.py's test image)."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([255 * x / (width - 1), 255 * y / (height - 1), 128 + 80 * np.sin(x / 9 + y / 5)], axis=-1)
    rgb += np.random.default_rng(0).normal(0.0, 20.0, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8))


def svdlite_call(unet, inputs: dict, device, dtype):
    """A zero-argument call of one guided evaluation; the context vectors are computed once, here (as generate)."""
    x, ts, context, y = inputs["svdlite"]
    t = inputs["frames"]
    x, ts, y = x.to(device, dtype), ts.to(device), y.to(device, dtype)
    with torch.no_grad():
        vectors = unet.context_vectors(context.to(device, dtype), t)
    return lambda: unet(x, ts, None, y, t, context_vectors=vectors)


def diffusers_call(unet, inputs: dict, device, dtype):
    sample, ts, context, ids = inputs["diffusers"]
    args = (sample.to(device, dtype), ts.to(device), context.to(device, dtype), ids.to(device, dtype))
    return lambda: unet(*args, return_dict=False)[0].flatten(0, 1)


def unet_macs(config, fold: bool, frames: int, height: int, width: int) -> int:
    """MACs of one guided evaluation (2 x frames rows) of svdlite's VideoUNet on the meta device: fold=True is
    svdlite's computation (context vectors outside, as timed), fold=False the original one (diffusers')."""
    from torch.utils.flop_counter import FlopCounterMode

    from svdlite.unet import VideoUNet

    with torch.device("meta"):
        net = VideoUNet(config, fold_cross_attention=fold).eval()
        inputs = unet_call_inputs(config, frames, height, width, 0)
        x, ts, context, y = (v.to("meta") for v in inputs["svdlite"])
    with torch.no_grad():
        vectors = net.context_vectors(context, frames) if fold else None
        with FlopCounterMode(display=False) as counter:
            net(x, ts, None if fold else context, y, frames, context_vectors=vectors)
    return counter.get_total_flops() // 2


# ------------------------------------------------------------------------------------------------ the run's state


class Context:
    """What the parts share: the device, the sizes, the random pipeline (built once), loaded models, the checks."""

    def __init__(self, args, log):
        self.args, self.log = args, log
        self.device = torch.device(args.device)
        self.quick = args.quick
        self.width = args.width or ("tiny" if args.quick else "full")
        self.sizes = SIZES["quick" if args.quick else "full"]
        self.speed_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
            args.speed_dtype or ("fp16" if self.device.type == "cuda" else "fp32")]
        self.clock = Clock(self.device)
        self.seed = args.seed
        self.checks: list[dict] = []
        self.setup: dict = {}
        self.cache: dict = {}
        self._workdir = None

    # -- checks
    def check(self, part: str, name: str, value, limit, kind: str = "max") -> bool:
        """Record a check: kind "max" passes when value <= limit, "min" when value >= limit, "true" when value."""
        if kind == "true":
            ok = bool(value)
        elif value is None or (isinstance(value, float) and math.isnan(value)):
            ok = False
        else:
            ok = value <= limit if kind == "max" else value >= limit
        self.checks.append({"part": part, "name": name, "value": value, "limit": limit, "kind": kind, "passed": ok})
        return ok

    # -- the weights
    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="svdlite-gpu-check-", dir=self.args.workdir))
        return self._workdir

    def pipeline(self):
        """(folder, diffusers pipeline in float16 on the CPU or wherever a part moved it), built once."""
        if "pipeline" not in self.cache:
            t0 = time.perf_counter()
            pipe = build_pipeline(self.width, self.seed)
            t1 = time.perf_counter()
            folder = self.workdir / "pipeline"
            pipe.save_pretrained(folder, variant="fp16")
            t2 = time.perf_counter()
            self.setup.update(width=self.width, build_seconds=t1 - t0, write_seconds=t2 - t1, folder_bytes=sum(
                f.stat().st_size for f in folder.rglob("*") if f.is_file()),
                params={k: sum(p.numel() for p in getattr(pipe, k).parameters())
                        for k in ("unet", "vae", "image_encoder")})
            self.log(f"setup: random {self.width}-width pipeline built in {t1 - t0:.1f}s, written in {t2 - t1:.1f}s")
            self.cache["pipeline"] = (folder, pipe)
            self.cache["pipe_at"] = (torch.device("cpu"), torch.float16)
        return self.cache["pipeline"]

    def folder(self) -> Path:
        return self.pipeline()[0]

    def svd_unet(self, dtype, device=None, keep: bool = False):
        """svdlite's UNet loaded from the folder (diffusers layout, fp16 files) in `dtype` on `device`."""
        from svdlite.loading import load_unet

        device = self.device if device is None else torch.device(device)
        key = ("unet", dtype, str(device))
        if key in self.cache:
            return self.cache[key]
        t0 = time.perf_counter()
        unet = load_unet(self.folder(), device=device, dtype=dtype).eval()
        self.setup.setdefault("loads", []).append({"what": f"svdlite unet {dtype} {device}",
                                                   "seconds": time.perf_counter() - t0})
        if keep:
            self.cache[key] = unet
        return unet

    def svd_model(self, dtype, keep: bool = False):
        from svdlite.components import load_model

        key = ("model", dtype)
        if key in self.cache:
            return self.cache[key]
        t0 = time.perf_counter()
        model = load_model(str(self.folder()), device=self.device, dtype=dtype)
        self.setup.setdefault("loads", []).append({"what": f"svdlite model {dtype} {self.device}",
                                                   "seconds": time.perf_counter() - t0})
        if keep:
            self.cache[key] = model
        return model

    def diffusers_pipe(self, device=None, dtype=None):
        """The diffusers pipeline moved to `device` (default: the check's device) and cast to `dtype` (default: the
        speed dtype); float16 is what the files hold, so another dtype gets the same values."""
        _, pipe = self.pipeline()
        where = (torch.device(device or self.device), dtype or self.speed_dtype)
        if self.cache.get("pipe_at") != where:
            pipe.to(*where)
            self.cache["pipe_at"] = where
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def drop(self, *keys) -> None:
        for key in keys:
            self.cache.pop(key, None)
        free(self.device)

    def peak(self) -> dict:
        if "peak" not in self.cache:
            dtypes = (torch.float16, torch.bfloat16) if self.device.type == "cuda" else (self.speed_dtype,)
            self.cache["peak"] = matmul_peak(self.device, self.sizes["matmul_n"], dtypes)
            self.log("  peak (measured matmul): " + ", ".join(f"{k} {v['tflops']:.4g} TFLOP/s"
                                                                for k, v in self.cache["peak"].items()))
        return self.cache["peak"]

    def close(self) -> None:
        self.cache.clear()
        free(self.device)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ fidelity


def materialize_reference(folder: Path) -> Path:
    """The reference weights, written by the folder's materialize.py into the tests' cache (tests/conftest.py:
    SVDLITE_TEST_CACHE or ~/.cache/svdlite-tests, keyed by the manifests' and materialize.py's content)."""
    manifests = sorted(folder.glob("*.weights.json"))
    if not manifests or not (folder / "materialize.py").is_file():
        raise FileNotFoundError(f"{folder} is not a reference folder (no materialize.py or *.weights.json)")
    digest = hashlib.sha256()
    for m in manifests + [folder / "materialize.py"]:
        digest.update(m.name.encode() + m.read_bytes())
    root = Path(os.environ.get("SVDLITE_TEST_CACHE", Path.home() / ".cache" / "svdlite-tests"))
    out = root / f"reference-{digest.hexdigest()[:16]}"
    if not (out / ".complete").exists():
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(folder / "materialize.py"), str(out)], check=True, capture_output=True)
        (out / ".complete").write_text("ok")
    return out


def reference_checks(ctx: Context) -> list[dict]:
    """The tests' reference comparisons, run on ctx.device in float32. One row per comparison (per-block ones
    summarised by their worst block)."""
    from safetensors.torch import load_file

    from svdlite.loading import load_unet
    from svdlite.sampling import (edm_sigmas, frame_guidance_scales, initial_latents, make_cfg_denoiser,
                                  sample_euler_edm)
    from svdlite.unet import UNetConfig
    from svdlite.vae import Encoder, VAEConfig, VideoDecoder, decode_latents, encode_condition, make_quant_conv
    from svdlite.vae_keymap import DECODER_PREFIX, FIRST_STAGE_ENCODER_PREFIX, QUANT_CONV_PREFIX

    folder = Path(ctx.args.reference).resolve()
    weights = materialize_reference(folder)
    dev = ctx.device
    rows = []

    def tensors(name):
        return load_file(str(folder / name))

    def cfg_json(name):
        return json.loads((folder / name).read_text())

    def on(t):
        return t.to(dev) if isinstance(t, torch.Tensor) else t

    def row(name, got, ref, kind="close"):
        if kind == "close":
            value, limit = close_ratio(got, ref), 1.0
        else:
            value, limit = rel_err(got, ref), REF_REL
        r = {"name": name, "kind": kind, "value": value, "limit": limit, "rel_err": rel_err(got, ref),
             "finite": finite(got)}
        r["passed"] = (value <= limit if kind == "close" else value < limit) and r["finite"]
        rows.append(r)
        return r

    def worst(name, got: dict, refs: dict):
        if set(got) != set(refs):
            raise AssertionError(f"{name}: hooked {len(got)} modules, the reference has {len(refs)}")
        per = {k: close_ratio(got[k], refs[k]) for k in refs}
        key = max(per, key=per.get)
        rows.append({"name": f"{name} ({len(per)}, worst {key})", "kind": "close", "value": per[key], "limit": 1.0,
                     "rel_err": max(rel_err(got[k], refs[k]) for k in refs),
                     "finite": all(finite(v) for v in got.values()), "passed": per[key] <= 1.0})

    # UNet (tests/test_unet_reference.py)
    config = UNetConfig.from_dict(cfg_json("unet_tiny_config.json")["params"])
    unet = load_unet(weights / "unet_tiny_sgm.safetensors", config, device=dev)
    io = {k: on(v) for k, v in tensors("unet_tiny_io.safetensors").items()}
    t = int(io["num_video_frames"])
    with torch.no_grad():
        for case in ("main", "varctx", "ioi"):
            pre = "" if case == "main" else case + "."
            inp = {n: io.get(pre + n, io[n]) for n in ("context", "y", "image_only_indicator")}
            out = unet(io["x"], io["timesteps"], inp["context"], inp["y"], t, inp["image_only_indicator"])
            row(f"unet {case} out", out, io[pre + "out"])
        vectors = unet.context_vectors(io["context"], t)
        out = unet(io["x"], io["timesteps"], None, io["y"], t, io["image_only_indicator"], context_vectors=vectors)
        row("unet main out, context vectors precomputed", out, io["out"])
    blocks = {k: v for k, v in tensors("unet_tiny_blocks.safetensors").items()}
    got = block_outputs(unet, blocks, lambda: unet(io["x"], io["timesteps"], io["context"], io["y"], t,
                                                    io["image_only_indicator"]))
    worst("unet blocks", got, blocks)
    del unet

    # VAE decoder and encoder (tests/test_vae.py)
    vae_cfg = cfg_json("vae_tiny_config.json")

    def vae_config(section):
        return VAEConfig.from_dict({**section.get("implicit_defaults", {}), **section["params"]})

    dec_cfg = vae_config(vae_cfg["decoder"])
    decoder = VideoDecoder(dec_cfg)
    sd = load_file(str(weights / "vae_decoder_tiny_sgm.safetensors"))
    decoder.load_state_dict({k[len(DECODER_PREFIX):]: v for k, v in sd.items()}, strict=True)
    decoder = decoder.eval().to(dev)
    dio = {k: on(v) for k, v in tensors("vae_decoder_tiny_io.safetensors").items()}
    td = int(dio["timesteps"])
    with torch.no_grad():
        for case in ("", "b2."):
            row(f"vae decoder {case or '1 video '}out".replace("b2.", "2 videos "), decoder(dio[case + "z"], td),
                dio[case + "out"])
    blocks = tensors("vae_decoder_tiny_blocks.safetensors")
    got = block_outputs(decoder, blocks, lambda: decoder(dio["z"], td))
    worst("vae decoder blocks", got, blocks)
    sio = {k: on(v) for k, v in tensors("sample_tiny_io.safetensors").items()}
    run_cfg = cfg_json("sample_tiny_config.json")
    tn = run_cfg["guider"]["num_frames"]
    with torch.no_grad():
        row("vae decode_latents (sampling run's decoded)",
            decode_latents(decoder, sio["samples"], tn, tn, vae_cfg["scale_factor"]), sio["decoded"])

    enc_cfg = vae_config(vae_cfg["encoder"])
    sd = load_file(str(weights / "vae_encoder_tiny_sgm.safetensors"))
    encoder, quant_conv = Encoder(enc_cfg), make_quant_conv(enc_cfg)
    encoder.load_state_dict({k[len(FIRST_STAGE_ENCODER_PREFIX):]: v for k, v in sd.items()
                             if k.startswith(FIRST_STAGE_ENCODER_PREFIX)}, strict=True)
    quant_conv.load_state_dict({k[len(QUANT_CONV_PREFIX):]: v for k, v in sd.items()
                                if k.startswith(QUANT_CONV_PREFIX)}, strict=True)
    encoder, quant_conv = encoder.eval().to(dev), quant_conv.eval().to(dev)
    eio = {k: on(v) for k, v in tensors("vae_encoder_tiny_io.safetensors").items()}
    with torch.no_grad():
        moments = encoder(eio["x"])
        got = {"moments": moments, "mode": moments[:, :enc_cfg.z_channels], "moments_quant_conv": quant_conv(moments),
               "mode_quant_conv": encode_condition(encoder, quant_conv, eio["x"])}
    for key, value in got.items():
        row(f"vae encoder {key}", value, eio[key])

    # the whole 5-step sampling run (tests/test_pipeline_reference.py)
    unet = load_unet(weights / "unet_tiny_sgm.safetensors", config, device=dev)
    context = torch.cat([sio["uc.crossattn"], sio["cond.crossattn"]])
    vector = torch.cat([sio["uc.vector"], sio["cond.vector"]])
    net_out, steps = [], []
    with torch.no_grad():
        vectors = unet.context_vectors(context, tn)

        def network(net_in, c_noise):
            out = unet(net_in, c_noise, None, vector, tn, sio["image_only_indicator"], context_vectors=vectors)
            net_out.append(out)
            return out

        d = run_cfg["discretization"]
        sigmas = edm_sigmas(run_cfg["sampler"]["num_steps"], d["sigma_min"], d["sigma_max"], d["rho"]).to(dev)
        scales = frame_guidance_scales(tn, run_cfg["guider"]["min_scale"], run_cfg["guider"]["max_scale"]).to(dev)
        denoise = make_cfg_denoiser(network, torch.cat([sio["uc.concat"], sio["cond.concat"]]), scales)
        samples = sample_euler_edm(denoise, initial_latents(sio["randn"], sigmas), sigmas,
                                   callback=lambda info: steps.append(info))
        decoded = decode_latents(decoder, samples, tn, tn, vae_cfg["scale_factor"])
    if len(steps) != run_cfg["sampler"]["num_steps"]:
        raise AssertionError(f"the sampling run took {len(steps)} steps, the reference "
                             f"{run_cfg['sampler']['num_steps']}")
    traces = (("x", [s["x"] for s in steps]), ("net_out", net_out), ("denoised", [s["denoised"] for s in steps]))
    for what, got in traces:
        per = [rel_err(g, sio[f"step{k}.{what}"]) for k, g in enumerate(got)]
        k = max(range(len(per)), key=per.__getitem__)
        rows.append({"name": f"sampling every step's {what} (worst step {k})", "kind": "rel", "value": per[k],
                     "limit": REF_REL, "rel_err": per[k], "finite": all(finite(g) for g in got),
                     "passed": per[k] < REF_REL and all(finite(g) for g in got)})
    row("sampling final latent", samples, sio["samples"], "rel")
    row("sampling decoded video", decoded, sio["decoded"], "rel")
    return rows


def eval_fp32(ctx: Context) -> torch.Tensor:
    """The full-width guided evaluation on the device in float32 (TF32 off), computed once."""
    if "eval_fp32" not in ctx.cache:
        s = ctx.sizes
        unet = ctx.svd_unet(torch.float32)
        inputs = unet_call_inputs(unet.config, s["eval_frames"], *s["eval_px"], ctx.seed)
        with exact_fp32(), torch.no_grad():
            ctx.cache["eval_fp32"] = svdlite_call(unet, inputs, ctx.device, torch.float32)().float().cpu()
        del unet
        free(ctx.device)
    return ctx.cache["eval_fp32"]


def default_tf32_unet(ctx: Context) -> dict:
    """The reference UNet's main case with torch's default float32 settings (on a GPU: cuDNN convolutions in TF32),
    to show what they cost against the reference; on the CPU the same as with TF32 off."""
    from safetensors.torch import load_file

    from svdlite.loading import load_unet
    from svdlite.unet import UNetConfig

    folder = Path(ctx.args.reference).resolve()
    config = UNetConfig.from_dict(json.loads((folder / "unet_tiny_config.json").read_text())["params"])
    unet = load_unet(materialize_reference(folder) / "unet_tiny_sgm.safetensors", config, device=ctx.device)
    io = {k: v.to(ctx.device) for k, v in load_file(str(folder / "unet_tiny_io.safetensors")).items()}
    with torch.no_grad():
        o = unet(io["x"], io["timesteps"], io["context"], io["y"], int(io["num_video_frames"]),
                 io["image_only_indicator"])
    try:
        legacy = torch.backends.cudnn.allow_tf32
    except RuntimeError as err:  # torch may refuse the legacy flag once the new API was used
        legacy = f"unreadable: {err}"
    return {"close_ratio": close_ratio(o, io["out"]), "rel_err": rel_err(o, io["out"]),
            "cudnn_conv_fp32_precision": getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None),
            "cudnn_allow_tf32": legacy}


def part_fidelity(ctx: Context) -> dict:
    out = {"tf32": "off (matmul and cuDNN convolutions in IEEE float32)"}
    with exact_fp32():
        rows = reference_checks(ctx)
    out["reference"] = rows
    for r in rows:
        ctx.check("fidelity", f"reference: {r['name']}", r["value"], r["limit"])
    out["reference_unet_main_with_torch_default_tf32"] = default_tf32_unet(ctx)
    # the full-width evaluation: device float32 against CPU float32
    s = ctx.sizes
    t0 = time.perf_counter()
    cpu_unet = ctx.svd_unet(torch.float32, device="cpu")
    inputs = unet_call_inputs(cpu_unet.config, s["eval_frames"], *s["eval_px"], ctx.seed)
    with torch.no_grad():
        ref = svdlite_call(cpu_unet, inputs, torch.device("cpu"), torch.float32)()
    cpu_seconds = time.perf_counter() - t0
    del cpu_unet
    got = eval_fp32(ctx)
    out["unet_eval_device_vs_cpu"] = {
        "width": ctx.width, "frames": s["eval_frames"], "batch": 2 * s["eval_frames"], "pixels": list(s["eval_px"]),
        "rel_err": rel_err(got, ref), "rel_l2": rel_l2(got, ref), "limit_rel_err": CPU_DEVICE_REL,
        "output_max_abs": ref.abs().max().item(), "finite": finite(got), "cpu_seconds_incl_load": cpu_seconds,
        "same_device": ctx.device.type == "cpu"}
    ctx.check("fidelity", f"{ctx.width}-width UNet eval, {ctx.device.type} fp32 vs cpu fp32 (max rel)",
              out["unet_eval_device_vs_cpu"]["rel_err"], CPU_DEVICE_REL)
    ctx.check("fidelity", f"{ctx.width}-width UNet eval finite", got.isfinite().all().item(), None, "true")
    return out


# ------------------------------------------------------------------------------------------------ half precision


def part_half(ctx: Context) -> dict:
    s = ctx.sizes
    ref = eval_fp32(ctx)
    out = {"eval": {"frames": s["eval_frames"], "pixels": list(s["eval_px"]), "width": ctx.width},
           "generate": {"settings": s["half_gen"]}}
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        unet = ctx.svd_unet(dtype)
        inputs = unet_call_inputs(unet.config, s["eval_frames"], *s["eval_px"], ctx.seed)
        with torch.no_grad():
            got = svdlite_call(unet, inputs, ctx.device, dtype)().float().cpu()
        del unet
        free(ctx.device)
        r = {"rel_l2": rel_l2(got, ref), "rel_err": rel_err(got, ref), "finite": finite(got)}
        out["eval"][name] = r
        ctx.check("half", f"UNet eval {name} vs fp32 rel L2", r["rel_l2"], HALF_LIMITS[name]["eval_rel_l2"])
        ctx.check("half", f"UNet eval {name} finite", r["finite"], None, "true")
    # a short generate in each dtype, same image, seed and initial noise
    g = s["half_gen"]
    image = make_image(g["height"], g["width"])
    noise = torch.randn(g["num_frames"], 4, g["height"] // 8, g["width"] // 8,
                        generator=torch.Generator().manual_seed(ctx.seed))
    videos = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        model = ctx.svd_model(dtype)
        from svdlite.pipeline import generate

        with exact_fp32() if dtype == torch.float32 else contextlib.nullcontext():
            seconds, video = ctx.clock(lambda: generate(image, model=model, seed=ctx.seed, latents=noise,
                                                        progress=False, **g), whole=True)
        videos[name] = video
        out["generate"].setdefault("seconds", {})[name] = seconds
        model = None
        free(ctx.device)
    ref_v = videos["float32"]
    for name in ("float16", "bfloat16"):
        v = videos[name]
        r = {"latents_rel_l2": rel_l2(v.latents, ref_v.latents), "latents_rel_err": rel_err(v.latents, ref_v.latents),
             "frames_psnr_db": psnr(v.frames.numpy(), ref_v.frames.numpy()),
             "frames_max_step": int((v.frames.int() - ref_v.frames.int()).abs().max()),
             "latents_finite": finite(v.latents)}
        out["generate"][name] = r
        lim = HALF_LIMITS[name]
        ctx.check("half", f"generate {name} vs fp32 final latents rel L2", r["latents_rel_l2"], lim["latents_rel_l2"])
        ctx.check("half", f"generate {name} vs fp32 frames PSNR dB", r["frames_psnr_db"], lim["frames_psnr_db"], "min")
        ctx.check("half", f"generate {name} final latents finite", r["latents_finite"], None, "true")
    ctx.check("half", "generate float32 final latents finite", finite(ref_v.latents), None, "true")
    return out


# ------------------------------------------------------------------------------------------------ speed


def unet_pair(ctx: Context):
    """(svdlite UNet, diffusers UNet, inputs) in the speed dtype on the device, at the speed size."""
    s = ctx.sizes
    svd = ctx.svd_model(ctx.speed_dtype, keep=True).unet  # one svdlite model serves the speed parts
    diff = ctx.diffusers_pipe().unet
    inputs = unet_call_inputs(svd.config, s["unet_frames"], *s["unet_px"], ctx.seed)
    return svd, diff, inputs


def macs_of(ctx: Context, config) -> dict:
    if "macs" not in ctx.cache:
        s = ctx.sizes
        ctx.cache["macs"] = {"svdlite": unet_macs(config, True, s["unet_frames"], *s["unet_px"]),
                             "diffusers": unet_macs(config, False, s["unet_frames"], *s["unet_px"])}
    return ctx.cache["macs"]


def part_speed_unet(ctx: Context) -> dict:
    s, dtype = ctx.sizes, ctx.speed_dtype
    svd, diff, inputs = unet_pair(ctx)
    calls = {"svdlite": svdlite_call(svd, inputs, ctx.device, dtype),
             "diffusers": diffusers_call(diff, inputs, ctx.device, dtype)}
    with torch.no_grad():
        a, b = calls["svdlite"]().float(), calls["diffusers"]().float()
    agree = {"rel_err": rel_err(b, a), "rel_l2": rel_l2(b, a), "finite": finite(a) and finite(b)}
    del a, b
    ctx.check("speed_unet", f"diffusers vs svdlite UNet eval ({str(dtype)[6:]}) max rel", agree["rel_err"],
              SAME_FUNCTION_REL)
    ctx.check("speed_unet", "UNet eval outputs finite", agree["finite"], None, "true")
    times = alternate(calls, ctx.clock, s["warmup"], s["rounds"], ctx.log)
    macs = macs_of(ctx, svd.config)
    peak = ctx.peak()
    peak_key = str(dtype).removeprefix("torch.")
    peak_tflops = peak.get(peak_key, next(iter(peak.values())))["tflops"]
    out = {"dtype": dtype, "frames": s["unet_frames"], "batch": 2 * s["unet_frames"], "pixels": list(s["unet_px"]),
           "latent": [s["unet_px"][0] // 8, s["unet_px"][1] // 8], "warmup": s["warmup"], "rounds": s["rounds"],
           "agreement": agree, "seconds": {k: stats(v) for k, v in times.items()},
           "ratio_diffusers_over_svdlite": stats([d / v for d, v in zip(times["diffusers"], times["svdlite"])]),
           "macs": macs, "peak_matmul": peak, "peak_tflops_used": peak_tflops,
           "peak_note": f"the {peak_key} {ctx.sizes['matmul_n']}^3 matmul measured in this run"}
    for side in ("svdlite", "diffusers"):
        tflops = 2 * macs[side] / out["seconds"][side]["median"] / 1e12
        out[f"{side}_tflops"] = tflops
        out[f"{side}_fraction_of_peak"] = tflops / peak_tflops
    return out


def diffusers_generate(pipe, image, noise, settings: dict, seed: int, device, dtype):
    """(final latents (frames, 4, h, w) float32 CPU, uint8 frames (T, H, W, 3) numpy) of the diffusers pipeline."""
    final = {}
    steps = settings["num_inference_steps"]

    def keep_last(p, i, t, kwargs):
        if i == steps - 1:
            final["latents"] = kwargs["latents"].clone()
        return {}

    frames = pipe(image, generator=torch.Generator().manual_seed(seed), latents=noise[None].to(device, dtype),
                  output_type="np", callback_on_step_end=keep_last, **settings).frames[0]
    return final["latents"][0].float().cpu(), (np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8)


def run_settings(settings: dict) -> dict:
    """`settings` with SVD-XT's conditioning and guidance filled in (fps, motion bucket, noise augmentation)."""
    return {**{k: XT[k] for k in ("fps", "motion_bucket_id", "noise_aug_strength", "min_guidance_scale",
                                  "max_guidance_scale")}, **settings}


def image_and_noise(settings: dict, seed: int):
    noise = torch.randn(settings["num_frames"], 4, settings["height"] // 8, settings["width"] // 8,
                        generator=torch.Generator().manual_seed(seed))
    return make_image(settings["height"], settings["width"]), noise


def svdlite_generate_call(ctx: Context, settings: dict, model=None):
    """A zero-argument whole svdlite run (the model in the speed dtype on the device, kept loaded by default)."""
    from svdlite.pipeline import generate

    model = model or ctx.svd_model(ctx.speed_dtype, keep=True)
    image, noise = image_and_noise(settings, ctx.seed)
    full = run_settings(settings)
    return lambda: generate(image, model=model, seed=ctx.seed, latents=noise, progress=False, **full)


def diffusers_generate_call(ctx: Context, settings: dict):
    image, noise = image_and_noise(settings, ctx.seed)
    full = run_settings(settings)
    pipe = ctx.diffusers_pipe()
    return lambda: diffusers_generate(pipe, image, noise, full, ctx.seed, ctx.device, ctx.speed_dtype)


def part_speed_generate(ctx: Context) -> dict:
    s = ctx.sizes
    settings = run_settings(s["gen"])
    calls = {"svdlite": svdlite_generate_call(ctx, s["gen"]), "diffusers": diffusers_generate_call(ctx, s["gen"])}
    outputs = {}

    def keep(name):
        def run():
            outputs[name] = calls[name]()
        return run

    times = alternate({k: keep(k) for k in calls}, ctx.clock, 1, s["gen_rounds"], ctx.log, whole=True)
    video = outputs["svdlite"]
    d_latents, d_frames = outputs["diffusers"]
    agree = {"latents_rel_err": rel_err(video.latents, d_latents), "latents_rel_l2": rel_l2(video.latents, d_latents),
             "frames_psnr_db": psnr(video.frames.numpy(), d_frames),
             "frames_max_step": int(np.abs(video.frames.numpy().astype(int) - d_frames.astype(int)).max()),
             "finite": finite(video.latents) and finite(d_latents)}
    ctx.check("speed_generate", "diffusers vs svdlite generate final latents max rel", agree["latents_rel_err"],
              SAME_FUNCTION_REL)
    ctx.check("speed_generate", "generate final latents finite (both)", agree["finite"], None, "true")
    return {"dtype": ctx.speed_dtype, "settings": settings, "rounds": s["gen_rounds"], "warmup": 1,
            "seconds": {k: stats(v) for k, v in times.items()},
            "ratio_diffusers_over_svdlite": stats([d / v for d, v in zip(times["diffusers"], times["svdlite"])]),
            "agreement": agree,
            "note": "timed: the whole generate / pipeline call (conditioning, sampling, decoding, frames to the host), "
                    "loading excluded; diffusers decodes in the pipeline's dtype, svdlite's VAE runs in float32"}


def part_memory(ctx: Context) -> dict:
    s, dev = ctx.sizes, ctx.device
    out = {"device": str(dev), "measured": dev.type == "cuda"}
    # the UNet evaluation, both UNets resident: the peak above what is resident before the call
    svd, diff, inputs = unet_pair(ctx)
    calls = {"svdlite": svdlite_call(svd, inputs, dev, ctx.speed_dtype),
             "diffusers": diffusers_call(diff, inputs, dev, ctx.speed_dtype)}
    unet_rows = {}
    for name, call in calls.items():
        with torch.no_grad():
            mem, _ = peak_memory(dev, call)
        unet_rows[name] = {"memory": mem, "weights_bytes": param_bytes(svd if name == "svdlite" else diff)}
    out["unet_eval"] = {"frames": s["unet_frames"], "pixels": list(s["unet_px"]), "dtype": ctx.speed_dtype,
                        **unet_rows}
    del calls, diff
    out["memory_choices"] = memory_choices(ctx, svd, inputs)
    del svd
    # a whole run at SVD-XT's default settings, each side alone on the device
    gen_rows = {}
    settings = run_settings(s["default"])
    ctx.diffusers_pipe(device="cpu")
    free(dev)
    model = ctx.svd_model(ctx.speed_dtype, keep=True)
    call = svdlite_generate_call(ctx, s["default"], model)
    seconds, (mem, _) = ctx.clock(lambda: peak_memory(dev, call), whole=True)
    gen_rows["svdlite"] = {"memory": mem, "seconds": seconds, "weights_bytes": sum(
        param_bytes(m) for m in (model.unet, model.vae_encoder, model.vae_decoder, model.image_encoder))}
    model = call = None
    ctx.drop(("model", ctx.speed_dtype))
    call = diffusers_generate_call(ctx, s["default"])
    pipe = ctx.diffusers_pipe()
    seconds, (mem, _) = ctx.clock(lambda: peak_memory(dev, call), whole=True)
    gen_rows["diffusers"] = {"memory": mem, "seconds": seconds, "weights_bytes": sum(
        param_bytes(m) for m in (pipe.unet, pipe.vae, pipe.image_encoder))}
    call = pipe = None
    ctx.diffusers_pipe(device="cpu")
    free(dev)
    out["generate_default"] = {"settings": settings, "dtype": ctx.speed_dtype, **gen_rows,
                               "note": "one run each, the other side's weights off the device; seconds include the "
                                       "first run of these settings in this process"}
    return out


@contextlib.contextmanager
def kernel_budgets(device: torch.device, **budgets):
    """svdlite.kernels' byte budgets set for the block; on a CPU device its GPU choices are forced (the CPU's own
    never slice the decoder), so a --device cpu run checks the same code paths."""
    from svdlite import kernels

    saved = {name: getattr(kernels, name) for name in budgets}
    try:
        for name, value in budgets.items():
            setattr(kernels, name, value)
        with kernels.as_device("cuda" if device.type == "cpu" else None):
            yield
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)


def memory_choices(ctx: Context, unet, inputs: dict) -> dict:
    """svdlite's memory choices (svdlite.kernels) on the device against one pass: the UNet evaluation with its
    feed-forward and group norms in chunks (the default budgets, and 16 MiB ones so a small size is chunked too)
    against budgets too large to chunk; the float32 VAE decoder on the default run's frames and size (one chunk)
    in 1-frame sub-batches against one batch. Bit for bit where the kernels do not depend on the row or frame count;
    else the difference is summation order: bounded by the float32 comparison limit (CPU_DEVICE_REL) for the
    decoder and the float32 UNet, by the half-precision gross-error bound for a fp16/bf16 UNet."""
    dev, dtype, never = ctx.device, ctx.speed_dtype, 2**62
    out = {}
    call = svdlite_call(unet, inputs, dev, dtype)
    with torch.no_grad():
        runs = {}
        for name, budget in (("one_pass", never), ("default", None), ("chunks_16mib", 16 * 2**20)):
            budgets = {} if budget is None else {"FF_MEMORY_BYTES": budget, "NORM_MEMORY_BYTES": budget}
            with kernel_budgets(dev, **budgets):
                mem, runs[name] = peak_memory(dev, call)
            out[f"unet_{name}_memory"] = mem
    limit = HALF_LIMITS.get(str(dtype).replace("torch.", ""), {}).get("eval_rel_l2", CPU_DEVICE_REL)
    for name in ("default", "chunks_16mib"):
        out[f"unet_{name}_bitwise"] = bool(torch.equal(runs[name], runs["one_pass"]))
        out[f"unet_{name}_rel_l2"] = rel_l2(runs[name].float(), runs["one_pass"].float())
        ctx.check("memory", f"UNet {name} chunks vs one pass rel L2", out[f"unet_{name}_rel_l2"], limit)
    del runs, call
    decoder = ctx.svd_model(dtype, keep=True).vae_decoder
    d = ctx.sizes["default"]
    frames = d["decode_chunk_size"]
    z = torch.randn(frames, 4, d["height"] // 8, d["width"] // 8,
                    generator=torch.Generator().manual_seed(ctx.seed)).to(dev)
    with torch.no_grad():
        with kernel_budgets(dev, DECODE_MEMORY_BYTES=never):
            mem_whole, whole = peak_memory(dev, lambda: decoder(z, frames))
        with kernel_budgets(dev, DECODE_MEMORY_BYTES=1):
            mem_sliced, sliced = peak_memory(dev, lambda: decoder(z, frames))
    out["decode"] = {"frames": frames, "pixels": [d["height"], d["width"]], "one_batch_memory": mem_whole,
                     "sub_batches_memory": mem_sliced, "bitwise": bool(torch.equal(sliced, whole)),
                     "max_rel": rel_err(sliced, whole)}
    ctx.check("memory", "decoder 1-frame sub-batches vs one batch max rel", out["decode"]["max_rel"], CPU_DEVICE_REL)
    ctx.log(f"    memory choices: UNet default chunks bitwise {out['unet_default_bitwise']}, rel L2 "
            f"{out['unet_default_rel_l2']:.2e}; decoder sub-batches bitwise {out['decode']['bitwise']}, max rel "
            f"{out['decode']['max_rel']:.2e}")
    return out


def part_levels(ctx: Context) -> dict:
    from svdlite.pipeline import generate

    s = ctx.sizes
    model = ctx.svd_model(ctx.speed_dtype, keep=True)
    size = s["levels_size"]
    image = make_image(size["height"], size["width"])
    with torch.no_grad():  # warm-up: one short run (kernels, allocator)
        generate(image, model=model, seed=ctx.seed, progress=False, **size, num_inference_steps=1)
    out = {"dtype": ctx.speed_dtype, "settings": size, "preset": model.preset, "seconds": {}, "steps": {}}
    for level in ("exact", "balanced", "fast"):
        from svdlite.run import RunSpec

        run = RunSpec.from_options(speed=level, **size).resolve(model)
        out["steps"][level] = run.plan.num_steps
        seconds, _ = ctx.clock(lambda: generate(image, model=model, seed=ctx.seed, progress=False, speed=level,
                                                **size), whole=True)
        out["seconds"][level] = seconds
        ctx.log(f"    {level}: {seconds:.2f}s ({run.plan.num_steps} steps)")
    out["speedup_vs_exact"] = {k: out["seconds"]["exact"] / v for k, v in out["seconds"].items()}
    return out


def part_compile(ctx: Context, budget_left) -> dict:
    s, dtype = ctx.sizes, ctx.speed_dtype
    svd, diff, inputs = unet_pair(ctx)
    eager = {"svdlite": svdlite_call(svd, inputs, ctx.device, dtype),
             "diffusers": diffusers_call(diff, inputs, ctx.device, dtype)}
    out = {"mode": "default", "dtype": dtype, "frames": s["unet_frames"], "pixels": list(s["unet_px"]),
           "compile_seconds": {}, "errors": {}}
    calls = dict(eager)
    for name, module in (("svdlite", svd), ("diffusers", diff)):
        if budget_left() < ESTIMATE_S["compile"] / 2 and not ctx.quick:
            out["errors"][name] = f"skipped: {budget_left():.0f}s of the budget left"
            continue
        try:
            torch._dynamo.reset()
            compiled = torch.compile(module)
            call = (svdlite_call(compiled, inputs, ctx.device, dtype) if name == "svdlite"
                    else diffusers_call(compiled, inputs, ctx.device, dtype))
            with torch.no_grad():
                seconds, first = ctx.clock(call, whole=True)
                ref = eager[name]()
            out["compile_seconds"][name] = seconds
            out.setdefault("agreement", {})[name] = {"rel_err": rel_err(first.float(), ref.float()),
                                                     "finite": finite(first)}
            ctx.check("compile", f"{name} compiled vs eager max rel", rel_err(first.float(), ref.float()),
                      SAME_FUNCTION_REL)
            calls[f"{name}_compiled"] = call
            ctx.log(f"    {name}: compiled in {seconds:.1f}s (first call)")
        except Exception as err:  # noqa: BLE001 - recorded, the other implementation still runs
            out["errors"][name] = f"{type(err).__name__}: {err}"
            out.setdefault("tracebacks", {})[name] = traceback.format_exc()
            ctx.check("compile", f"{name} torch.compile", False, None, "true")
    times = alternate(calls, ctx.clock, s["warmup"], s["rounds"], ctx.log)
    out["seconds"] = {k: stats(v) for k, v in times.items()}
    for name in ("svdlite", "diffusers"):
        if f"{name}_compiled" in times:
            out.setdefault("speedup_compiled", {})[name] = stats(
                [e / c for e, c in zip(times[name], times[f"{name}_compiled"])])
    macs = macs_of(ctx, svd.config)
    out["tflops"] = {k: 2 * macs[k.split("_")[0]] / v["median"] / 1e12 for k, v in out["seconds"].items()}
    return out


# ------------------------------------------------------------------------------------------------ report


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
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}",
                    multiprocessors=p.multi_processor_count)
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.SubprocessError) as err:
            info["nvidia_smi"] = f"unavailable: {err}"
    return info


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


def print_report(r: dict) -> None:
    m = r["machine"]
    p = r["parts"]
    where = (f"{m.get('gpu')} ({_gib(m.get('gpu_memory_bytes'))} GiB, sm {m.get('capability')}), "
             f"nvidia-smi: {m.get('nvidia_smi')}" if "gpu" in m else m["cpu"])
    print(f"\ncommand: {r['command']}")
    print(f"svdlite {m['svdlite']} from {m['svdlite_path']}")
    print(f"device: {r['device']}: {where}; torch {m['torch']} (CUDA {m['torch_cuda']}), diffusers {m['diffusers']}, "
          f"transformers {m['transformers']}, open_clip {m['open_clip_torch']}; {m['cpu']}, {m['threads']} threads")
    su = r.get("setup", {})
    if "params" in su:
        print(f"weights: random {su['width']}-width pipeline, params {su['params']}; built {su['build_seconds']:.1f}s, "
              f"written {su['write_seconds']:.1f}s ({_gib(su['folder_bytes'])} GiB fp16)")
    print(f"\n{'part':<16}{'status':<10}{'seconds':>9}")
    for name, part in p.items():
        print(f"{name:<16}{part['status']:<10}{_f(part.get('seconds'), '.1f'):>9}  {part.get('error', '')[:100]}")
    print(f"total {r['total_seconds']:.1f}s (budget {r['budget_s']}s)")

    def section(name, fn):
        part = p.get(name, {})
        if part.get("status") != "ok":
            return
        try:
            fn(part["result"])
        except Exception as err:  # noqa: BLE001 - a printing slip must not hide the rest
            print(f"  ({name}: cannot print: {err!r})")

    def fidelity(x):
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

    def half(x):
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

    def speed_unet(x):
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

    def speed_generate(x):
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

    def memory(x):
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

    def levels(x):
        print("\nspeed levels: " + ", ".join(f"{k} {v:.2f}s ({x['steps'][k]} steps, x{x['speedup_vs_exact'][k]:.2f})"
                                              for k, v in x["seconds"].items()))

    def compiled(x):
        print(f"\ntorch.compile (mode {x['mode']}): compile (first call) "
              + ", ".join(f"{k} {v:.1f}s" for k, v in x["compile_seconds"].items())
              + "".join(f"; {k}: {v[:120]}" for k, v in x["errors"].items()))
        for k, st in x["seconds"].items():
            print(f"  {k:<20} median {st['median'] * 1e3:9.1f} ms  {x['tflops'][k]:.4g} TFLOP/s")
        for k, st in x.get("speedup_compiled", {}).items():
            print(f"  {k} eager/compiled: median {st['median']:.3f}")

    for name, fn in (("fidelity", fidelity), ("half", half), ("speed_unet", speed_unet),
                     ("speed_generate", speed_generate), ("memory", memory), ("levels", levels),
                     ("compile", compiled)):
        section(name, fn)
    failed = [c for c in r["checks"] if not c["passed"]]
    print(f"\nchecks: {len(r['checks']) - len(failed)} of {len(r['checks'])} passed")
    for c in failed:
        print(f"  FAILED {c['part']}: {c['name']}: {_f(c['value'])} (limit {c['kind']} {_f(c['limit'])})")


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="exit codes: 0 every part ran and every check passed, 1 a part failed or "
                                            "a check did not pass, 2 refused (bad arguments, --json PATH exists "
                                            "without --force)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} (default: all; --quick: all "
                                        "but compile)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny width and small sizes (the CPU check: --device cpu --quick, well under a minute)")
    parser.add_argument("--width", choices=("full", "tiny"), help="network width (default full; --quick: tiny)")
    parser.add_argument("--speed-dtype", choices=("fp16", "bf16", "fp32"),
                        help="dtype of the speed, memory and levels parts (default fp16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="skip a part when the elapsed time plus its full-size estimate exceeds this (default 480)")
    parser.add_argument("--reference", default=str(DEFAULT_REFERENCE),
                        help="the sgm reference folder (default tests/reference)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--workdir", help="where the temporary pipeline folder goes (default: the system temp dir)")
    parser.add_argument("--json", metavar="PATH", help="write the whole result as JSON to PATH")
    add_force(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json:
        check_outputs(parser, [Path(args.json)], args.force)
    parts = list(PARTS if not args.parts else args.parts.split(","))
    if args.quick and not args.parts:
        parts.remove("compile")
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts takes {','.join(PARTS)}; got {args.parts!r}")
    parts = [p for p in PARTS if p in parts]  # most valuable first, whatever the order given
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device: {err}")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device takes cuda, cuda:N or cpu, got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA GPU here (use --device cpu --quick for the CPU check)")
        if device.index is None:  # torch.cuda.set_device and the allocator statistics want the index
            device = torch.device("cuda", torch.cuda.current_device())
        args.device = str(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join([sys.executable, "tools/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = Context(args, log)
    result = {"command": command, "device": str(device), "quick": args.quick, "width": ctx.width,
              "budget_s": args.budget_s, "parts_asked": parts, "machine": machine(device), "parts": {},
              "sizes": SIZES["quick" if args.quick else "full"]}

    def budget_left():
        return args.budget_s - (time.perf_counter() - start)

    runners = {"fidelity": part_fidelity, "half": part_half, "speed_unet": part_speed_unet,
               "speed_generate": part_speed_generate, "memory": part_memory, "levels": part_levels,
               "compile": lambda c: part_compile(c, budget_left)}
    try:
        for name in parts:
            elapsed = time.perf_counter() - start
            estimate = 0 if args.quick else ESTIMATE_S[name]
            if elapsed + estimate > args.budget_s:
                result["parts"][name] = {"status": "skipped", "error": f"budget: {elapsed:.0f}s elapsed + ~{estimate}s "
                                                                        f"estimate > {args.budget_s:.0f}s"}
                log(f"{name}: skipped ({result['parts'][name]['error']})")
                continue
            log(f"{name}: running ({elapsed:.0f}s elapsed)")
            t0 = time.perf_counter()
            try:
                out = runners[name](ctx)
                result["parts"][name] = {"status": "ok", "seconds": time.perf_counter() - t0, "result": out}
            except Exception as err:  # noqa: BLE001 - recorded; the other parts still run
                result["parts"][name] = {"status": "failed", "seconds": time.perf_counter() - t0,
                                         "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
                log(f"{name}: FAILED\n{traceback.format_exc()}")
                free(device)
            log(f"{name}: {result['parts'][name]['status']} in {time.perf_counter() - t0:.1f}s")
            if args.json:  # what is measured so far survives a crash of a later part
                result.update(setup=ctx.setup, checks=ctx.checks, total_seconds=time.perf_counter() - start)
                write_text(args.json, json.dumps(jsonable(result), indent=1))
    finally:
        ctx.close()
    result.update(setup=ctx.setup, checks=ctx.checks, total_seconds=time.perf_counter() - start)
    result["passed"] = (all(p["status"] == "ok" for p in result["parts"].values())
                        and all(c["passed"] for c in ctx.checks))
    if args.json:
        write_text(args.json, json.dumps(jsonable(result), indent=1))
    print_report(result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
