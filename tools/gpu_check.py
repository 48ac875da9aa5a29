#!/usr/bin/env python3
"""Everything a CUDA GPU must show of svdlite, in one command: fidelity, half precision, speed and memory.

    python tools/gpu_check.py [--device cuda] [--parts P,...] [--budget-s S] [--reference DIR] [--json PATH] [--force]
    python tools/gpu_check.py --device cpu --quick [--json PATH]          # tiny width, every part but compile

Random weights, no Hub: one diffusers SVD pipeline (UNetSpatioTemporalConditionModel, AutoencoderKLTemporalDecoder,
CLIPVisionModelWithProjection) is written to a temporary folder by svdlite.testing.write_diffusers_pipeline (every
parameter from svdlite.testing.random_tensors, seeded; diffusers' own init zeroes mix factors and projections, which
would hide mistakes), as fp16 files as the released checkpoints ship, and read back in float16. svdlite loads that
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
import json
import math
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from bench_generate import make_image
from benchlib import REPO, log, stats
from gpu_measure import (Clock, alternate, exact_fp32, finite, free, matmul_peak, param_bytes, peak_memory, psnr,
                         rel_err, rel_l2)
from gpu_reference import REF_REL, default_tf32_unet, reference_checks  # noqa: F401 - REF_REL: the tests' limit
from gpu_report import jsonable, machine, print_report
from svdlite.outputs import add_force, check_outputs, write_text
from svdlite.testing import unet_call_inputs, write_diffusers_pipeline

DEFAULT_REFERENCE = REPO / "tests" / "reference"
PARTS = ("fidelity", "half", "speed_unet", "speed_generate", "memory", "levels", "compile")
# seconds each part took, measured at full width on one H100/H200-class GPU or estimated from its work where not yet
# measured: a part starts only if the elapsed time plus this fits in --budget-s
ESTIMATE_S = {"fidelity": 40, "half": 60, "speed_unet": 30, "speed_generate": 50, "memory": 45, "levels": 45,
              "compile": 240}
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


# ------------------------------------------------------------------------------------------------ the calls


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
        """(folder, diffusers pipeline in float16 on the CPU or wherever a part moved it), made once: the folder
        written by write_diffusers_pipeline (built and written in one call: `build_seconds`), then read back
        (`write_seconds`: the folder's reading, the step that made it to memory)."""
        if "pipeline" not in self.cache:
            from diffusers import StableVideoDiffusionPipeline
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.set_verbosity_error()  # not the info lines of every CPU-generator draw
            folder = self.workdir / "pipeline"
            t0 = time.perf_counter()
            write_diffusers_pipeline(folder, self.width, self.seed, num_frames=25)  # SVD-XT's default frame count
            t1 = time.perf_counter()
            pipe = StableVideoDiffusionPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16)
            for name in ("unet", "vae", "image_encoder"):  # inference only: a weight that requires grad sends some
                getattr(pipe, name).eval().requires_grad_(False)  # CPU ops down another kernel (other rounding)
            t2 = time.perf_counter()
            self.setup.update(width=self.width, build_seconds=t1 - t0, write_seconds=t2 - t1, folder_bytes=sum(
                f.stat().st_size for f in folder.rglob("*") if f.is_file()),
                params={k: sum(p.numel() for p in getattr(pipe, k).parameters())
                        for k in ("unet", "vae", "image_encoder")})
            self.log(f"setup: random {self.width}-width pipeline built and written in {t1 - t0:.1f}s, read back in "
                     f"{t2 - t1:.1f}s")
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


def part_fidelity(ctx: Context) -> dict:
    out = {"tf32": "off (matmul and cuDNN convolutions in IEEE float32)"}
    with exact_fp32():
        rows = reference_checks(ctx.args.reference, ctx.device)
    out["reference"] = rows
    for r in rows:
        ctx.check("fidelity", f"reference: {r['name']}", r["value"], r["limit"])
    out["reference_unet_main_with_torch_default_tf32"] = default_tf32_unet(ctx.args.reference, ctx.device)
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


def parse_args(argv):
    """(args, the parts to run in the tool's order, the torch device); refusals exit with code 2 (parser.error)."""
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
    return args, parts, device


def run_part(name: str, runner, ctx: Context, result: dict) -> None:
    """One part, timed, its result or its failure (with the traceback) recorded in result["parts"][name]."""
    t0 = time.perf_counter()
    try:
        out = runner(ctx)
        result["parts"][name] = {"status": "ok", "seconds": time.perf_counter() - t0, "result": out}
    except Exception as err:  # noqa: BLE001 - recorded; the other parts still run
        result["parts"][name] = {"status": "failed", "seconds": time.perf_counter() - t0,
                                 "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        ctx.log(f"{name}: FAILED\n{traceback.format_exc()}")
        free(ctx.device)
    ctx.log(f"{name}: {result['parts'][name]['status']} in {time.perf_counter() - t0:.1f}s")


def finish(result: dict, ctx: Context, start: float, json_path: str | None) -> None:
    """The setup, checks and total time into the result, written to `json_path` where asked."""
    result.update(setup=ctx.setup, checks=ctx.checks, total_seconds=time.perf_counter() - start)
    if json_path:
        write_text(json_path, json.dumps(jsonable(result), indent=1))


def run_parts(ctx: Context, parts: list[str], result: dict, start: float) -> None:
    """Each part in turn, unless the elapsed time plus its estimate exceeds the budget; the JSON written after each
    part, so what is measured so far survives a crash of a later part."""
    args = ctx.args

    def budget_left():
        return args.budget_s - (time.perf_counter() - start)

    runners = {"fidelity": part_fidelity, "half": part_half, "speed_unet": part_speed_unet,
               "speed_generate": part_speed_generate, "memory": part_memory, "levels": part_levels,
               "compile": lambda c: part_compile(c, budget_left)}
    for name in parts:
        elapsed = time.perf_counter() - start
        estimate = 0 if args.quick else ESTIMATE_S[name]
        if elapsed + estimate > args.budget_s:
            result["parts"][name] = {"status": "skipped", "error": f"budget: {elapsed:.0f}s elapsed + ~{estimate}s "
                                                                    f"estimate > {args.budget_s:.0f}s"}
            ctx.log(f"{name}: skipped ({result['parts'][name]['error']})")
            continue
        ctx.log(f"{name}: running ({elapsed:.0f}s elapsed)")
        run_part(name, runners[name], ctx, result)
        finish(result, ctx, start, args.json)


def main(argv=None) -> int:
    args, parts, device = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join([sys.executable, "tools/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = Context(args, log)
    result = {"command": command, "device": str(device), "quick": args.quick, "width": ctx.width,
              "budget_s": args.budget_s, "parts_asked": parts, "machine": machine(device), "parts": {},
              "sizes": SIZES["quick" if args.quick else "full"]}
    try:
        run_parts(ctx, parts, result, start)
    finally:
        ctx.close()
    result.update(setup=ctx.setup, checks=ctx.checks, total_seconds=time.perf_counter() - start)
    result["passed"] = (all(p["status"] == "ok" for p in result["parts"].values())
                        and all(c["passed"] for c in ctx.checks))
    finish(result, ctx, start, args.json)
    print_report(result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
