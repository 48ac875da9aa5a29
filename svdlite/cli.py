"""The `svdlite` command: `svdlite generate IMAGE -o OUT ...` and `svdlite info CHECKPOINT`."""
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
    g.add_argument("--model", default="svd-xt",
                   help="preset (svd, svd-xt, svd-xt-1.1, tiny), an original .safetensors file, a diffusers folder "
                        "or an svdlite converted file (default: svd-xt, downloaded from the Hugging Face Hub)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    g.add_argument("--num-frames", type=int)
    g.add_argument("--steps", type=int, dest="num_inference_steps", help="denoising steps")
    g.add_argument("--fps", type=int, help="frame rate of the video; the model is conditioned on fps - 1")
    g.add_argument("--motion-bucket-id", type=int)
    g.add_argument("--noise-aug-strength", type=float)
    g.add_argument("--min-guidance", type=float, dest="min_guidance_scale")
    g.add_argument("--max-guidance", type=float, dest="max_guidance_scale")
    g.add_argument("--guidance-cut-step", type=int, default=None,
                   help="from this step on run only the conditional branch (approximate; off by default)")
    g.add_argument("--decode-chunk-size", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", choices=DTYPES, default="fp32")
    g.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="describe a checkpoint", description="Print a checkpoint's format, components, "
                                                                        "parameter counts and preset.")
    i.add_argument("checkpoint", help="a .safetensors file, a diffusers folder or a preset name (not downloaded)")
    return p


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
    options = {k: getattr(args, k) for k in (
        "num_frames", "num_inference_steps", "fps", "motion_bucket_id", "noise_aug_strength", "min_guidance_scale",
        "max_guidance_scale", "decode_chunk_size", "height", "width", "seed", "guidance_cut_step")}
    video = generate(args.image, model=args.model, device=args.device, dtype=dtype, progress=not args.no_progress,
                     **{k: v for k, v in options.items() if v is not None})
    video.save(args.output, overwrite=args.force)
    print(f"wrote {args.output} ({len(video)} frames, {video.width}x{video.height}, {video.fps:g} fps)")
    return 0


def _info(args) -> int:
    from .components import describe

    for line in describe(args.checkpoint):
        print(line)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _generate(args) if args.command == "generate" else _info(args)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as err:
        print(f"svdlite: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
