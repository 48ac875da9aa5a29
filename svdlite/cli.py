"""The `svdlite` command: `svdlite generate IMAGE -o OUT ...`, `svdlite batch INPUT... -o OUTDIR ...` (also under
torchrun: `torchrun --nproc-per-node N -m svdlite batch ...`), `svdlite calibrate IMAGES -o S.json` and
`svdlite info CHECKPOINT`.

Every subcommand runs through `run_cleanly`: an error is one line `svdlite: error: ...` on stderr (the
traceback only with --debug) and an exit code; Ctrl-C and SIGTERM stop cleanly, leaving no partial file.
Exit codes (README "Errors and exit codes"):
  0    done
  1    the run failed while working (non-finite values, out of memory, a download or write that failed), or
       (batch) an item failed
  2    refused before any work: bad option, image, checkpoint, setting or output path
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)
"""
import argparse
import contextlib
import os
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


# how long a SIGTERM that arrived inside a finalizer waits before it is sent again
FINALIZER_RETRY_SECONDS = 0.01


def _raise_terminated(signum, frame):
    # Python prints and drops an exception raised inside a finalizer (`__del__`, which the garbage collector runs
    # wherever it happens to collect): there, send the signal again shortly, to arrive once the finalizer returned
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            threading.Timer(FINALIZER_RETRY_SECONDS, os.kill, (os.getpid(), signum)).start()
            return
        frame = frame.f_back
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
    _sampling_options(g)
    _plan_options(g)
    g.add_argument("--decode-chunk-size", type=int, help="frames decoded at once; lower needs less memory "
                                                         "(default: 14, or 7 for svd-xt-1.1)")
    g.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    _batch_parser(sub)
    c = add_subcommand(sub, "calibrate", _calibrate, help="calibrate an F3-Pruning schedule",
                       description="Sample the images with the exact computation and record, for every temporal "
                                   "transformer block at every step, the F3 statistics; write them as a schedule "
                                   "for `svdlite generate --f3-schedule`. Use the step count and frame count you "
                                   "will generate with (a schedule for other ones is refused).")
    c.add_argument("images", type=Path, nargs="+", help="input images (image k uses seed + k)")
    c.add_argument("-o", "--output", type=Path, required=True, help="schedule file to write (.json)")
    _sampling_options(c, seed_default=0)
    c.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    i = add_subcommand(sub, "info", _info, help="describe a checkpoint",
                       description="Print a checkpoint's format, components, parameter counts and preset, and "
                                   "whether it holds everything generation needs.")
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
    b = add_subcommand(sub, "batch", _batch,
                       help="make videos from many images (also on several processes with torchrun)",
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
                        "or an svdlite converted file; presets are downloaded from the Hugging Face Hub "
                        "(default: svd-xt)")
    p.add_argument("--seed", type=int, default=seed_default,
                   help="random seed in [0, 2**64); the same seed and settings give the same file "
                        f"(default: {'a random one, printed' if seed_default is None else seed_default})")
    p.add_argument("--num-frames", type=int, help="frames to generate (default: the preset's, 14 or 25)")
    p.add_argument("--steps", type=int, dest="num_inference_steps", help="denoising steps (default: 25 or 30)")
    p.add_argument("--schedule", choices=("edm", "ays"), default=None,
                   help="noise schedule: edm (SVD's own, default) or ays (Align Your Steps; 10 steps unless --steps)")
    p.add_argument("--fps", type=int, help="frame rate of the video; the model is conditioned on fps - 1 "
                                           "(default: 7)")
    p.add_argument("--motion-bucket-id", type=int,
                   help="amount of motion, >= 0; higher moves more (trained on 0..255; default: 127)")
    p.add_argument("--noise-aug-strength", type=float,
                   help="std of the noise added to the condition image, >= 0; more makes the video depart further "
                        "from the image (default: 0.02)")
    p.add_argument("--min-guidance", type=float, dest="min_guidance_scale",
                   help="guidance scale of the first frame; it rises linearly to --max-guidance at the last "
                        "(default: 1.0 or 1.5)")
    p.add_argument("--max-guidance", type=float, dest="max_guidance_scale",
                   help="guidance scale of the last frame, >= --min-guidance (default: 2.5 or 3.0)")
    p.add_argument("--height", type=int, help="video height, a multiple of 64 (default: 576)")
    p.add_argument("--width", type=int, help="video width, a multiple of 64 (default: 1024)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N, mps, or auto: the GPU when there is one (default: auto)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="precision of the UNet and CLIP; the VAE always runs in fp32 (default: fp32)")


SAMPLING_KEYS = ("num_frames", "num_inference_steps", "fps", "motion_bucket_id", "noise_aug_strength",
                 "min_guidance_scale", "max_guidance_scale", "height", "width")
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _load(args):
    """The model of `--model` on `--device` in `--dtype`, with a line saying what is loaded where."""
    import torch

    from .checks import resolve_device
    from .components import load_model

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    print(f"loading {_model_line(args.model)} on {device}{f' ({name})' if name else ''}, {args.dtype}")
    return load_model(args.model, device=device, dtype=getattr(torch, TORCH_DTYPES[args.dtype]))


def _calibrate(args) -> int:
    from .calibrate import calibrate_f3
    from .checks import check_settings, resolve_device
    from .image import open_image
    from .presets import PRESETS

    options = {k: getattr(args, k) for k in SAMPLING_KEYS if getattr(args, k) is not None}
    check_settings(**options, seed=args.seed, size_multiple=64 if args.model in PRESETS else None)
    if args.output.exists() and not args.force:
        raise FileExistsError(f"{args.output} exists; pass --force to overwrite it")
    if not args.output.parent.is_dir():
        raise FileNotFoundError(f"output folder {args.output.parent} does not exist")
    images = [open_image(path) for path in args.images]
    resolve_device(args.device)
    schedule = calibrate_f3(images, model=_load(args), seed=args.seed, schedule=args.schedule,
                            progress=not args.no_progress, **options)
    schedule.save(args.output, overwrite=args.force)
    print(f"wrote {args.output} ({len(schedule.units)} temporal blocks x {schedule.num_steps} steps = "
          f"{schedule.num_units} units, {len(args.images)} image(s))")
    return 0


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

    from .checks import check_settings, resolve_device
    from .f3 import F3Schedule
    from .image import open_image
    from .pipeline import generate
    from .plan import check_options, speed_options
    from .presets import PRESETS
    from .video import check_output

    options = {k: getattr(args, k) for k in SAMPLING_KEYS + ("decode_chunk_size", "seed", "guidance_cut_step")}
    check_settings(**options, size_multiple=64 if args.model in PRESETS else None)  # every preset's network: 64
    output = check_output(args.output, overwrite=args.force)
    if output.resolve() == args.image.resolve():
        raise ValueError(f"output {output} is the input image; choose another output file")
    image = open_image(args.image)
    plan_options = {"f3_ratio": args.f3_ratio, "f3_statistic": args.f3_statistic, "cache_interval": args.cache_interval,
                    "cache_depth": args.cache_depth, "schedule": args.schedule}
    check_options(speed_options(args.speed, plan_options | {"guidance_cut_step": args.guidance_cut_step}),
                  args.f3_schedule is not None)
    f3_schedule = None if args.f3_schedule is None else F3Schedule.load(args.f3_schedule)
    resolve_device(args.device)
    if options["seed"] is None:
        options["seed"] = secrets.randbelow(2**32)
        print(f"seed: {options['seed']} (pass --seed {options['seed']} to make this video again)")
    video = generate(image, model=_load(args), progress=not args.no_progress, f3_schedule=f3_schedule,
                     speed=args.speed, **plan_options, **{k: v for k, v in options.items() if v is not None})
    video.save(output, overwrite=args.force)
    print(f"wrote {output} ({len(video)} frames, {video.width}x{video.height}, {video.fps:g} fps)")
    return 0


def _batch(args) -> int:
    import torch

    from .batch import OPTION_KEYS, run_batch
    from .plan import check_options, speed_options

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    options = {k: getattr(args, k) for k in OPTION_KEYS if getattr(args, k) is not None}
    check_options(speed_options(args.speed, {k: v for k, v in options.items() if k != "speed"}),
                  args.f3_schedule is not None)  # before the model loads
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
    return run_cleanly(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
