"""The `svdlite` command: `svdlite generate IMAGE -o OUT ...`, `svdlite batch INPUT... -o OUTDIR ...` (also under
torchrun: `torchrun --nproc-per-node N -m svdlite batch ...`), `svdlite calibrate ...` and `svdlite info CHECKPOINT`."""
import argparse
import sys
from pathlib import Path

DTYPES = ("fp32", "fp16", "bf16")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svdlite", description="Stable Video Diffusion image-to-video, without diffusers.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="make a video from an image",
                       description="Make a video from one image. Unset options take the model preset's defaults "
                                   "(svd: 14 frames, 25 steps; svd-xt / svd-xt-1.1: 25 frames, 30 steps).")
    g.add_argument("image", type=Path, help="input image (any format PIL reads)")
    g.add_argument("-o", "--output", type=Path, required=True, help="output video: .mp4 (H.264), .webm or .gif")
    _sampling_options(g)
    _plan_options(g)
    g.add_argument("--decode-chunk-size", type=int)
    g.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    _batch_parser(sub)
    c = sub.add_parser("calibrate", help="calibrate an F3-Pruning schedule",
                       description="Sample the images with the exact computation and record, for every temporal "
                                   "transformer block at every step, the F3 statistics; write them as a schedule "
                                   "for `svdlite generate --f3-schedule`. Use the step count and frame count you "
                                   "will generate with (a schedule for other ones is refused).")
    c.add_argument("images", type=Path, nargs="+", help="input images (image k uses seed + k)")
    c.add_argument("-o", "--output", type=Path, required=True, help="schedule file to write (.json)")
    _sampling_options(c, seed_default=0)
    c.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="describe a checkpoint", description="Print a checkpoint's format, components, "
                                                                        "parameter counts and preset.")
    i.add_argument("checkpoint", help="a .safetensors file, a diffusers folder or a preset name (not downloaded)")
    return p


def _plan_options(g: argparse.ArgumentParser) -> None:
    """The approximate acceleration options `generate` and `batch` share (one per-step plan, plan.py)."""
    g.add_argument("--guidance-cut-step", type=int, default=None,
                   help="from this step on run only the conditional branch (approximate; off by default)")
    g.add_argument("--f3-schedule", type=Path, help="F3-Pruning schedule from `svdlite calibrate` (approximate)")
    g.add_argument("--f3-ratio", type=float, default=None,
                   help="skip this ratio [0, 1) of the lowest-ranked temporal units (default 0: exact)")
    g.add_argument("--f3-statistic", choices=("attention", "contribution"), default=None,
                   help="the schedule's ranking statistic (default: attention, the F3 paper's)")
    g.add_argument("--cache-interval", type=int,
                   help="step caching: every N-th step runs the whole UNet, the others reuse its deep features "
                        "(approximate; 1 = off)")
    g.add_argument("--cache-depth", type=int, help="step caching: the recomputed branch, 0 = the shallowest")
    g.add_argument("--speed", choices=("exact", "balanced", "fast"), default="exact",
                   help="a tested combination of the approximate options (README: what each trades); options "
                        "given explicitly override it")


def _batch_parser(sub) -> None:
    b = sub.add_parser("batch", help="make videos from many images (also on several processes with torchrun)",
                       description="Make one video per input image, OUTDIR/<image name>.<format>. Inputs whose "
                                   "output exists are skipped (an interrupted run resumes); OUTDIR/manifest.jsonl "
                                   "records every item. Under `torchrun --nproc-per-node N -m svdlite batch ...` "
                                   "each process takes its share, on the GPU of its local rank (--device auto, the "
                                   "default; the CPU when there is no GPU). Exit code 1 if any item failed.")
    b.add_argument("inputs", type=Path, nargs="+", help="image files, folders (their images, sorted) or .txt files "
                                                         "listing image paths (one a line)")
    b.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    _sampling_options(b, seed_default=0)
    b.set_defaults(device="auto")  # the GPU of the process's local rank when there are GPUs, else the CPU
    _plan_options(b)
    b.add_argument("--decode-chunk-size", type=int)
    b.add_argument("--batch-size", type=int, default=1, help="videos per UNet evaluation (default 1)")
    b.add_argument("--format", choices=("mp4", "webm", "gif"), default="mp4", help="output format (default mp4)")
    b.add_argument("--overwrite", action="store_true", help="redo inputs whose output exists (default: skip them)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sampling_options(p: argparse.ArgumentParser, seed_default: int | None = None) -> None:
    """The model and sampling options `generate` and `calibrate` share."""
    p.add_argument("--model", default="svd-xt",
                   help="preset (svd, svd-xt, svd-xt-1.1, tiny), an original .safetensors file, a diffusers folder "
                        "or an svdlite converted file (default: svd-xt, downloaded from the Hugging Face Hub)")
    p.add_argument("--seed", type=int, default=seed_default,
                   help=f"random seed (default: {'random' if seed_default is None else seed_default})")
    p.add_argument("--num-frames", type=int)
    p.add_argument("--steps", type=int, dest="num_inference_steps", help="denoising steps")
    p.add_argument("--schedule", choices=("edm", "ays"), default=None,
                   help="noise schedule: edm (SVD's own, default) or ays (Align Your Steps; 10 steps unless --steps)")
    p.add_argument("--fps", type=int, help="frame rate of the video; the model is conditioned on fps - 1")
    p.add_argument("--motion-bucket-id", type=int)
    p.add_argument("--noise-aug-strength", type=float)
    p.add_argument("--min-guidance", type=float, dest="min_guidance_scale")
    p.add_argument("--max-guidance", type=float, dest="max_guidance_scale")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")


SAMPLING_KEYS = ("num_frames", "num_inference_steps", "fps", "motion_bucket_id", "noise_aug_strength",
                 "min_guidance_scale", "max_guidance_scale", "height", "width")


def _calibrate(args) -> int:
    import torch

    from .calibrate import calibrate_f3

    if args.output.exists() and not args.force:
        print(f"svdlite: {args.output} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    if not args.output.parent.is_dir():
        print(f"svdlite: output folder {args.output.parent} does not exist", file=sys.stderr)
        return 2
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        print(f"svdlite: input image(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    options = {k: getattr(args, k) for k in SAMPLING_KEYS if getattr(args, k) is not None}
    schedule = calibrate_f3(args.images, model=args.model, seed=args.seed, schedule=args.schedule,
                            device=args.device, dtype=dtype, progress=not args.no_progress, **options)
    schedule.save(args.output, overwrite=args.force)
    print(f"wrote {args.output} ({len(schedule.units)} temporal blocks x {schedule.num_steps} steps = "
          f"{schedule.num_units} units, {len(args.images)} image(s))")
    return 0


def _generate(args) -> int:
    import torch

    from .pipeline import generate

    if args.output.exists() and not args.force:
        print(f"svdlite: {args.output} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    if not args.image.is_file():
        print(f"svdlite: input image {args.image} not found", file=sys.stderr)
        return 2
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    options = {k: getattr(args, k) for k in SAMPLING_KEYS + ("decode_chunk_size", "seed", "guidance_cut_step")}
    video = generate(args.image, model=args.model, device=args.device, dtype=dtype, progress=not args.no_progress,
                     schedule=args.schedule, f3_schedule=args.f3_schedule, f3_ratio=args.f3_ratio,
                     f3_statistic=args.f3_statistic, cache_interval=args.cache_interval, cache_depth=args.cache_depth,
                     speed=args.speed, **{k: v for k, v in options.items() if v is not None})
    video.save(args.output, overwrite=args.force)
    print(f"wrote {args.output} ({len(video)} frames, {video.width}x{video.height}, {video.fps:g} fps)")
    return 0


def _batch(args) -> int:
    import torch

    from .batch import OPTION_KEYS, run_batch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    options = {k: getattr(args, k) for k in OPTION_KEYS if getattr(args, k) is not None}
    summary = run_batch(args.inputs, args.output, model=args.model, seed=args.seed, batch_size=args.batch_size,
                        overwrite=args.overwrite, video_format=args.format, device=args.device, dtype=dtype,
                        progress=not args.no_progress, **options)
    if summary["rank"] == 0:
        minutes = summary["seconds"] / 60
        rate = f", {summary['done'] / minutes:.2f} videos/min" if summary["done"] and minutes > 0 else ""
        print(f"{summary['done']} done, {summary['failed']} failed, {summary['skipped']} skipped (output existed) "
              f"in {summary['seconds']:.1f} s on {summary['world_size']} process(es){rate}; "
              f"manifest: {args.output / 'manifest.jsonl'}")
    return 1 if summary["failed"] else 0


def _info(args) -> int:
    from .components import describe

    for line in describe(args.checkpoint):
        print(line)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"generate": _generate, "batch": _batch, "calibrate": _calibrate,
                "info": _info}[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as err:
        print(f"svdlite: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
