#!/usr/bin/env python3
"""How far the approximate guidance cut moves svdlite's output from the exact output (same seed, same settings).

    python tools/measure_guidance_cut.py [--model tiny|fullwidth|PATH|PRESET] [--steps N] [--frames N]
                                         [--cuts K1,K2,...] [--seed S] [--height H] [--width W] [--image IMG]
                                         [--device cpu] [--dtype fp32|fp16|bf16] [--json]

`svdlite.generate(..., guidance_cut_step=K)` runs classifier-free guidance for steps 0..K-1 and only the
conditional branch from step K on; K = steps is the exact computation (guidance_cut_step=None). For each K this
reports, against the exact run with the same seed: the relative L2 distance of the final latents
(||z_K - z|| / ||z||), the mean and max absolute difference of the uint8 frames, the PSNR of all frames together
and of the worst frame, and the UNet evaluations (guided calls on 2*frames + conditional-only calls on frames).

Models:
  tiny       the bundled random-weight model (svdlite.load_model("tiny"), its preset's size, frames and steps);
  fullwidth  SVD's full-size networks (UNetConfig(), VAEConfig(), CLIPVisionConfig(), ~2.1B parameters, ~8.5 GB
             fp32) assembled in memory from random weights (svdlite.testing.random_tensors), with the svd-xt
             preset's sampling defaults (guidance 1.5 -> 3.0), at 64x128 pixels, 8 frames, 10 steps by default;
  PATH / preset name   anything svdlite.load_model takes (real weights: this is the measurement that matters).
Random weights say nothing about visual quality; see the caveat the script prints.
"""
import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

import svdlite
from svdlite.clip import CLIPVisionConfig, build_image_encoder
from svdlite.components import SVDModel
from svdlite.testing import random_tensors
from svdlite.unet import UNetConfig, VideoUNet
from svdlite.vae import ConditionEncoder, VAEConfig, VideoDecoder

EXAMPLE = Path(svdlite.__file__).parent / "assets" / "example.png"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FULLWIDTH_DEFAULTS = {"height": 64, "width": 128, "frames": 8, "steps": 10}
CAVEAT = (
    "Caveat: {what} These numbers only say how much the guidance cut CHANGES the output relative to the exact "
    "computation with the same seed; they say nothing about whether the video looks better or worse, and with "
    "random weights nothing about visual quality at all (the exact output itself is noise, and how strongly the "
    "conditional and guided predictions differ depends on the weights, so real models may move more or less). "
    "Whether a cut step is acceptable is a judgement on real videos, at the real size and frame count, and is "
    "one command for anyone with the weights:\n  {command}")


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


def frame_metrics(frames: torch.Tensor, exact: torch.Tensor) -> dict:
    """uint8 (T, H, W, 3) frames against the exact ones: mean/max |diff| and PSNR (all frames; worst frame)."""
    diff = frames.to(torch.int16) - exact.to(torch.int16)
    sq = diff.double().pow(2)
    mse, mse_frames = sq.mean().item(), sq.flatten(1).mean(1)

    def psnr(m: float) -> float:
        return math.inf if m == 0 else 10 * math.log10(255.0 ** 2 / m)

    return {"frames_mean_abs": diff.abs().double().mean().item(), "frames_max_abs": int(diff.abs().max()),
            "psnr_db": psnr(mse), "psnr_worst_frame_db": psnr(mse_frames.max().item())}


def default_cuts(steps: int) -> list[int]:
    """0 (no guided step at all), 40/60/80 % of the steps, and `steps` (the exact computation: a zero check)."""
    return sorted({0, steps} | {min(max(round(f * steps), 1), steps) for f in (0.4, 0.6, 0.8)})


def measure(model: SVDModel, image=EXAMPLE, *, steps: int | None = None, frames: int | None = None,
            cuts: list[int] | None = None, seed: int = 0, height: int | None = None, width: int | None = None,
            device="cpu", dtype=torch.float32, log=None) -> dict:
    """Generate the exact video and one per cut step K with the same seed; return settings and one row per K."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    d = model.sampling
    steps, frames = steps or d.num_inference_steps, frames or d.num_frames
    height, width = height or d.height, width or d.width
    cuts = default_cuts(steps) if cuts is None else sorted(set(cuts))
    bad = [k for k in cuts if not 0 <= k <= steps]
    if bad:
        raise ValueError(f"cut steps {bad} are outside [0, {steps}]")
    kwargs = dict(model=model, num_frames=frames, num_inference_steps=steps, height=height, width=width, seed=seed,
                  device=device, dtype=dtype, progress=False)
    start = time.perf_counter()
    exact = svdlite.generate(image, guidance_cut_step=None, **kwargs)
    log(f"exact run: {time.perf_counter() - start:.1f}s")
    ref = exact.latents.double()
    rows = []
    for k in cuts:
        start = time.perf_counter()
        video = svdlite.generate(image, guidance_cut_step=k, **kwargs)
        seconds = time.perf_counter() - start
        rel_l2 = ((video.latents.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        rows.append({"cut_step": k, "guided_evals": k, "conditional_evals": steps - k, "latents_rel_l2": rel_l2,
                     **frame_metrics(video.frames, exact.frames), "seconds": seconds})
        log(f"K={k}: rel L2 {rel_l2:.3e} ({seconds:.1f}s)")
    guided = d.max_guidance_scale > 1
    return {"source": model.source, "preset": model.preset, "steps": steps, "frames": frames, "height": height,
            "width": width, "seed": seed, "min_guidance_scale": d.min_guidance_scale,
            "max_guidance_scale": d.max_guidance_scale, "guidance_active": guided,
            "image": str(image), "dtype": str(dtype).replace("torch.", ""), "device": str(device), "rows": rows}


def _fmt_psnr(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2f}"


def print_table(r: dict, command: str, real_command: str, what: str) -> None:
    print(f"command: {command}")
    print(f"model: {r['source']} (preset {r['preset']}: guidance {r['min_guidance_scale']} -> {r['max_guidance_scale']} "
          f"over the frames)")
    print(f"{r['frames']} frames, {r['height']}x{r['width']} px, {r['steps']} steps, seed {r['seed']}, {r['dtype']} on "
          f"{r['device']}, image {r['image']}")
    print("every row is compared with the exact run (guidance_cut_step=None) with the same seed and settings\n")
    if not r["guidance_active"]:
        print("NOTE: max_guidance_scale <= 1: guidance is off, so every cut step gives the exact output.\n")
    header = (f"{'K':>4}{'guided+cond evals':>19}{'latents rel L2':>16}{'frames mean|d|':>16}{'frames max|d|':>15}"
              f"{'PSNR dB':>10}{'worst-frame PSNR':>18}")
    print(header)
    print("-" * len(header))
    for row in r["rows"]:
        evals = f"{row['guided_evals']}+{row['conditional_evals']}"
        print(f"{row['cut_step']:>4}{evals:>19}{row['latents_rel_l2']:>16.3e}{row['frames_mean_abs']:>16.3f}"
              f"{row['frames_max_abs']:>15d}{_fmt_psnr(row['psnr_db']):>10}{_fmt_psnr(row['psnr_worst_frame_db']):>18}")
    print("\n(K: guidance_cut_step; steps 0..K-1 guided (one UNet call on 2*frames), K.. conditional only (one call "
          "on frames); K = steps is exact. frames |d| in uint8 levels 0-255.)\n")
    print(CAVEAT.format(what=what, command=real_command))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny | fullwidth | a checkpoint path or preset name")
    parser.add_argument("--steps", type=int, help="default: the preset's (fullwidth: 10)")
    parser.add_argument("--frames", type=int, help="default: the preset's (fullwidth: 8)")
    parser.add_argument("--height", type=int, help="pixels; default: the preset's (fullwidth: 64)")
    parser.add_argument("--width", type=int, help="pixels; default: the preset's (fullwidth: 128)")
    parser.add_argument("--cuts", help="comma-separated cut steps K (default: 0, 40/60/80%% of the steps, steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image", default=str(EXAMPLE))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON dict")
    args = parser.parse_args(argv)
    try:
        cuts = [int(k) for k in args.cuts.split(",") if k.strip()] if args.cuts else None
    except ValueError:
        parser.error(f"--cuts must be comma-separated integers, got {args.cuts!r}")
    command = shlex.join([sys.executable, "tools/measure_guidance_cut.py", *(sys.argv[1:] if argv is None else argv)])
    dtype = DTYPES[args.dtype]
    size = dict(steps=args.steps, frames=args.frames, height=args.height, width=args.width)
    start = time.perf_counter()
    if args.model == "fullwidth":
        size = {k: v if v is not None else FULLWIDTH_DEFAULTS[k] for k, v in size.items()}
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
    try:
        result = measure(model, args.image, cuts=cuts, seed=args.seed, device=args.device, dtype=dtype, **size)
    except ValueError as e:
        parser.error(str(e))
    real_command = ("python tools/measure_guidance_cut.py --model ~/models/svd_xt.safetensors --device cuda "
                    "--dtype fp16 --image photo.jpg   (svd-xt defaults: 25 frames, 576x1024, 30 steps; or "
                    "--model svd-xt to download, or a diffusers folder)")
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
