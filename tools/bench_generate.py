#!/usr/bin/env python3
"""A whole image-to-video run, svdlite's `generate` against diffusers' `StableVideoDiffusionPipeline`.

Used by tools/benchmark.py (`--parts generate`). One diffusers pipeline folder is written with random weights
(`svdlite.testing.write_diffusers_pipeline`: every parameter from svdlite.testing.random_tensors, fp16 files as the
released checkpoints ship) at SVD's full width or the tiny width; each side loads it through its own loader, in
float32, in a fresh process per run (`--child`), and runs the same image, the same initial noise and the same
settings (3 Euler steps, 14 frames, 128x128 pixels, guidance 1.0 -> 2.5, decoding in chunks of 14 included).
Timed: the generate / pipeline call (loading excluded); also reported: the process's peak resident memory. The
outputs are checked to agree first: final latents (max |a - b| / max |b|) and uint8 frames (max step).

    python tools/bench_generate.py --write FOLDER [--width full|tiny] [--seed S] [--force]
    python tools/bench_generate.py --child diffusers|svdlite FOLDER OUT.npz [--threads N] [--seed S] [--force]

An existing output (FOLDER of --write, OUT of --child) is refused unless --force; each is written under a temporary
name beside it and renamed when complete.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import benchlib
from svdlite.outputs import add_force, atomic_file, atomic_folder, check_outputs
from svdlite.testing import write_diffusers_pipeline


SETTINGS = dict(num_frames=14, num_inference_steps=3, fps=7, motion_bucket_id=127, noise_aug_strength=0.02,
                min_guidance_scale=1.0, max_guidance_scale=2.5, decode_chunk_size=14, height=128, width=128)
LATENT_TOLERANCE = 5e-3  # diffusers' GroupNorm eps 1e-6 in some ResBlocks (svdlite: the original 1e-5), 3 steps


def make_image(height: int, width: int):
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([255 * x / (width - 1), 255 * y / (height - 1), 128 + 80 * np.sin(x / 9 + y / 5)], axis=-1)
    rgb += np.random.default_rng(0).normal(0.0, 20.0, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8))


def child(side: str, folder: str, out: str, threads: int, seed: int) -> dict:
    """Load (float32), run once, save the final latents and uint8 frames to `out` (.npz); returns the timing."""
    torch.set_num_threads(threads)
    s = SETTINGS
    image = make_image(s["height"], s["width"])
    noise = torch.randn(s["num_frames"], 4, s["height"] // 8, s["width"] // 8,
                        generator=torch.Generator().manual_seed(seed))
    if side == "diffusers":
        from diffusers import StableVideoDiffusionPipeline

        pipe = StableVideoDiffusionPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        final = {}

        def keep_last(p, i, t, kwargs):
            if i == s["num_inference_steps"] - 1:
                final["latents"] = kwargs["latents"].clone()
            return {}

        start = time.perf_counter()
        frames = pipe(image, generator=torch.Generator().manual_seed(seed), latents=noise[None], output_type="pt",
                      callback_on_step_end=keep_last, **s).frames[0]
        seconds = time.perf_counter() - start
        latents = final["latents"][0]
        uint8 = np.stack([np.asarray(im) for im in pipe.video_processor.numpy_to_pil(
            frames.permute(0, 2, 3, 1).float().numpy())])
    else:
        from svdlite.components import load_model
        from svdlite.pipeline import generate

        model = load_model(folder, dtype=torch.float32)
        start = time.perf_counter()
        video = generate(image, model=model, seed=seed, latents=noise, progress=False, **s)
        seconds = time.perf_counter() - start
        latents, uint8 = video.latents, video.frames.numpy()  # (T, H, W, 3)
    with atomic_file(out) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
        np.savez(fh, latents=latents.float().numpy(), frames=uint8)
    return {"seconds": seconds, "peak_rss": benchlib.peak_rss()}


def _run(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=benchlib.child_env())
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def measure_generate(folder: Path, width: str, rounds: int, threads: int, seed: int, log=print) -> dict:
    """Write the pipeline in `folder` (an existing, empty work folder), check both sides agree, time `rounds`
    alternating runs (each its own process)."""
    pipeline = folder / "pipeline"
    _run(["--write", str(pipeline), "--width", width, "--seed", str(seed)])
    log(f"wrote a random {width}-width diffusers SVD pipeline to {pipeline}")
    runs = {"diffusers": [], "svdlite": []}
    outputs = {}
    for r in range(rounds):
        for side in (("diffusers", "svdlite") if r % 2 == 0 else ("svdlite", "diffusers")):
            npz = folder / f"{side}-{r}.npz"
            runs[side].append(_run(["--child", side, str(pipeline), str(npz), "--threads", str(threads),
                                    "--seed", str(seed)]))
            if side not in outputs:
                with np.load(npz) as z:
                    outputs[side] = {k: z[k] for k in z.files}
        log(f"  generate round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]['seconds']:.2f}s" for k, v in runs.items()))
    a, b = outputs["svdlite"], outputs["diffusers"]
    latent_diff = float(np.abs(a["latents"] - b["latents"]).max() / max(np.abs(b["latents"]).max(), 1e-30))
    frame_diff = int(np.abs(a["frames"].astype(int) - b["frames"].astype(int)).max())
    return {"width": width, "settings": SETTINGS, "rounds": rounds,
            "seconds": {k: statistics.median(m["seconds"] for m in v) for k, v in runs.items()},
            "seconds_all": {k: [m["seconds"] for m in v] for k, v in runs.items()},
            "peak_rss": {k: max(m["peak_rss"] for m in v) for k, v in runs.items()},
            "ratio": statistics.median(s["seconds"] / d["seconds"] for s, d in zip(runs["svdlite"], runs["diffusers"])),
            "latent_rel_diff": latent_diff, "frame_max_step": frame_diff,
            "agree": latent_diff <= LATENT_TOLERANCE}


def print_generate(r: dict) -> None:
    s = r["settings"]
    print(f"\nwhole generate, {r['width']} width, {s['height']}x{s['width']} px, {s['num_frames']} frames, "
          f"{s['num_inference_steps']} steps, decoding included, float32, each run a fresh process ({r['rounds']} "
          f"alternating rounds, loading excluded)")
    print(f"outputs: final latents max rel diff {r['latent_rel_diff']:.2e} (tolerance {LATENT_TOLERANCE:.0e}), uint8 "
          f"frames max step {r['frame_max_step']}: {'AGREE' if r['agree'] else 'DISAGREE'}")
    for side in ("diffusers", "svdlite"):
        print(f"  {side:<10} median {r['seconds'][side]:8.2f} s   peak RSS {r['peak_rss'][side] / 2**30:6.2f} GiB")
    print(f"  svdlite/diffusers time (per round, median): {r['ratio']:.3f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="run by tools/benchmark.py --parts generate; exit code 2: refused (bad "
                                            "arguments, an output exists without --force)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", metavar="FOLDER", type=Path,
                      help="write a random diffusers SVD pipeline folder FOLDER (its parent must exist)")
    mode.add_argument("--child", nargs=3, metavar=("SIDE", "FOLDER", "OUT"),
                      help="one run: SIDE diffusers or svdlite loads the pipeline FOLDER, saves the final latents and "
                           "frames to OUT (.npz) and prints its timing as one JSON line")
    parser.add_argument("--width", choices=("full", "tiny"), default="full", help="--write: network width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="--child: torch threads")
    add_force(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.write:
        check_outputs(parser, [args.write], args.force)
        with atomic_folder(args.write) as folder:
            write_diffusers_pipeline(folder, args.width, args.seed)
        return 0
    side, folder, out = args.child
    if side not in ("diffusers", "svdlite"):
        parser.error(f"--child SIDE is diffusers or svdlite, got {side!r}")
    check_outputs(parser, [Path(out)], args.force)
    print(json.dumps(child(side, folder, out, args.threads, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
