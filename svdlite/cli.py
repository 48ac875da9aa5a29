"""The `svdlite` command: `svdlite generate IMAGE -o OUT ...` and `svdlite info CHECKPOINT`.

Every subcommand runs through `run_cleanly`: an error is one line `svdlite: error: ...` on stderr (the
traceback only with --debug) and an exit code; Ctrl-C and SIGTERM stop cleanly, leaving no partial file.
Exit codes (README "Errors and exit codes"):
  0    done
  1    the run failed while working (non-finite values, out of memory, a download or write that failed)
  2    refused before any work: bad option, image, checkpoint, setting or output path
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)
"""
import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

from . import __version__

DTYPES = ("fp32", "fp16", "bf16")
EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143
# errors that mean "this input cannot work", raised by the checks before the model runs
REFUSED = (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
           PermissionError)


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that `finally` blocks remove temporary files."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises():
    """Within the block, SIGTERM raises `Terminated` instead of killing the process outright.

    Only the main thread can handle signals: elsewhere (svdlite run from a thread) SIGTERM keeps its handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def error_line(err: BaseException) -> str:
    """One line: the message, with the exception type when the message alone would not say what happened."""
    text = " ".join(str(err).split())
    if text and isinstance(err, (*REFUSED, FloatingPointError, RuntimeError)):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def run_cleanly(command, args) -> int:
    """Run `command(args)` (a subcommand) and turn what it raises into one stderr line and an exit code."""
    debug = getattr(args, "debug", False)
    try:
        with sigterm_raises():
            return command(args)
    except KeyboardInterrupt:
        print("\nsvdlite: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("svdlite: terminated; nothing was written", file=sys.stderr)
        return EXIT_TERMINATED
    except REFUSED as err:
        if debug:
            raise
        print(f"svdlite: error: {error_line(err)}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as err:  # noqa: BLE001 - any failure is one line unless --debug
        if debug:
            raise
        print(f"svdlite: error: {error_line(err)} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED


def add_subcommand(sub, name: str, command, **kwargs) -> argparse.ArgumentParser:
    """A subparser with the options every subcommand shares (--debug), running `command(args)`."""
    p = sub.add_parser(name, **kwargs)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    p.set_defaults(command=command)
    return p


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svdlite", description="Stable Video Diffusion image-to-video, without diffusers.",
                                epilog="exit codes: 0 done, 1 failed while working, 2 refused before any work "
                                       "(bad option, input or output path), 130 Ctrl-C, 143 SIGTERM")
    p.add_argument("--version", action="version", version=f"svdlite {__version__}")
    sub = p.add_subparsers(dest="subcommand", required=True)
    g = add_subcommand(sub, "generate", _generate, help="make a video from an image",
                       description="Make a video from one image. Unset options take the model preset's defaults "
                                   "(svd: 14 frames, 25 steps, guidance 1.0-2.5; svd-xt / svd-xt-1.1: 25 frames, "
                                   "30 steps, guidance 1.5-3.0; all: 576x1024, fps 7, motion bucket 127, noise "
                                   "augmentation 0.02). Settings, image and output path are checked before the "
                                   "model loads.")
    g.add_argument("image", type=Path, help="input image, any format PIL reads; first frame of an animation, EXIF "
                                            "rotation applied, transparency over white, scaled to cover the size "
                                            "and centre-cropped")
    g.add_argument("-o", "--output", type=Path, required=True,
                   help="output video: .mp4 (H.264), .webm (VP9) or .gif; its folder must exist")
    g.add_argument("--model", default="svd-xt",
                   help="preset (svd, svd-xt, svd-xt-1.1, tiny), an original .safetensors file, a diffusers folder "
                        "or an svdlite converted file; presets are downloaded from the Hugging Face Hub "
                        "(default: svd-xt)")
    g.add_argument("--seed", type=int, default=None,
                   help="random seed in [0, 2**64); the same seed and settings give the same file "
                        "(default: a random one, printed)")
    g.add_argument("--num-frames", type=int, help="frames to generate (default: the preset's, 14 or 25)")
    g.add_argument("--steps", type=int, dest="num_inference_steps", help="denoising steps (default: 25 or 30)")
    g.add_argument("--fps", type=int, help="frame rate of the video; the model is conditioned on fps - 1 "
                                           "(default: 7)")
    g.add_argument("--motion-bucket-id", type=int,
                   help="amount of motion, >= 0; higher moves more (trained on 0..255; default: 127)")
    g.add_argument("--noise-aug-strength", type=float,
                   help="std of the noise added to the condition image, >= 0; more makes the video depart further "
                        "from the image (default: 0.02)")
    g.add_argument("--min-guidance", type=float, dest="min_guidance_scale",
                   help="guidance scale of the first frame; it rises linearly to --max-guidance at the last "
                        "(default: 1.0 or 1.5)")
    g.add_argument("--max-guidance", type=float, dest="max_guidance_scale",
                   help="guidance scale of the last frame, >= --min-guidance (default: 2.5 or 3.0)")
    g.add_argument("--guidance-cut-step", type=int, default=None,
                   help="from this step on run only the conditional branch (approximate; off by default)")
    g.add_argument("--decode-chunk-size", type=int, help="frames decoded at once; lower needs less memory "
                                                         "(default: 14, or 7 for svd-xt-1.1)")
    g.add_argument("--height", type=int, help="video height, a multiple of 64 (default: 576)")
    g.add_argument("--width", type=int, help="video width, a multiple of 64 (default: 1024)")
    g.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N, mps, or auto: the GPU when there is one (default: auto)")
    g.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="precision of the UNet and CLIP; the VAE always runs in fp32 (default: fp32)")
    g.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    i = add_subcommand(sub, "info", _info, help="describe a checkpoint",
                       description="Print a checkpoint's format, components, parameter counts and preset, and "
                                   "whether it holds everything generation needs.")
    i.add_argument("checkpoint", help="a .safetensors file, a diffusers folder or a preset name (not downloaded)")
    return p


def _size(path: Path) -> str:
    files = [path] if path.is_file() else list(path.rglob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    return f"{total / 1e9:.2f} GB" if total >= 1e8 else f"{total / 1e6:.1f} MB"


def _model_line(model: str) -> str:
    from .presets import PRESETS

    if model in PRESETS and PRESETS[model].repo_id:
        return f"{model} from Hugging Face {PRESETS[model].repo_id} (about 4.5 GB, downloaded once into its cache)"
    if model in PRESETS:
        return f"{model} (bundled, {_size(Path(__file__).parent / 'assets' / 'tiny.safetensors')})"
    return f"{model} ({_size(Path(model))})" if Path(model).exists() else model


def _generate(args) -> int:
    import secrets

    import torch

    from .checks import check_settings, resolve_device
    from .components import load_model
    from .image import open_image
    from .pipeline import generate
    from .presets import PRESETS
    from .video import check_output

    options = {k: getattr(args, k) for k in (
        "num_frames", "num_inference_steps", "fps", "motion_bucket_id", "noise_aug_strength", "min_guidance_scale",
        "max_guidance_scale", "decode_chunk_size", "height", "width", "seed", "guidance_cut_step")}
    check_settings(**options, size_multiple=64 if args.model in PRESETS else None)  # every preset's network: 64
    output = check_output(args.output, overwrite=args.force)
    if output.resolve() == args.image.resolve():
        raise ValueError(f"output {output} is the input image; choose another output file")
    image = open_image(args.image)
    device = resolve_device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if options["seed"] is None:
        options["seed"] = secrets.randbelow(2**32)
        print(f"seed: {options['seed']} (pass --seed {options['seed']} to make this video again)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    print(f"loading {_model_line(args.model)} on {device}{f' ({name})' if name else ''}, {args.dtype}")
    model = load_model(args.model, device=device, dtype=dtype)
    video = generate(image, model=model, progress=not args.no_progress,
                     **{k: v for k, v in options.items() if v is not None})
    video.save(output, overwrite=args.force)
    print(f"wrote {output} ({len(video)} frames, {video.width}x{video.height}, {video.fps:g} fps)")
    return 0


def _info(args) -> int:
    from .components import describe

    for line in describe(args.checkpoint):
        print(line)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return run_cleanly(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
