"""The `svdlite` command: `svdlite generate IMAGE -o OUT ...`, `svdlite batch INPUT... -o OUTDIR ...` (also under
torchrun: `torchrun --nproc-per-node N -m svdlite batch ...`), `svdlite calibrate IMAGES -o S.json` and
`svdlite info CHECKPOINT`.

Every subcommand runs through `errors.run_cleanly`: an error is one line `svdlite: error: ...` on stderr (the
traceback only with --debug) and an exit code (errors.py lists them); Ctrl-C and SIGTERM stop cleanly, leaving no
partial file.
"""
import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from .errors import run_cleanly
from .version import __version__

DTYPES = ("auto", "fp32", "fp16", "bf16")


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
                                   "30 steps, guidance 1.5-3.0; all: 1024x576 (width x height), fps 7, motion "
                                   "bucket 127, noise augmentation 0.02). Settings, options, image and output "
                                   "path are checked before the model loads.")
    g.add_argument("image", type=Path, help="input image, any format PIL reads; first frame of an animation, EXIF "
                                            "rotation applied, transparency over white, scaled to cover the size "
                                            "and centre-cropped")
    g.add_argument("-o", "--output", type=Path, required=True,
                   help="output video: .mp4 (H.264), .webm (VP9) or .gif; its folder must exist")
    _sampling_options(g)
    _plan_options(g)
    g.add_argument("--decode-chunk-size", type=int, help="frames decoded at once; lower needs less memory "
                                                         "(default: 14, or 7 for svd-xt-1.1)")
    g.add_argument("--offload", choices=("model",), default=None,
                   help="model: keep the networks in CPU memory and move each to the GPU only while it works (for "
                        "GPUs too small for all four; slower by the moves)")
    g.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    _batch_parser(sub)
    c = add_subcommand(sub, "calibrate", _calibrate, help="calibrate an F3-Pruning schedule",
                       description="Sample the images with the exact computation and record, for every temporal "
                                   "transformer block at every step, the F3 statistics; write them as a schedule "
                                   "for `svdlite generate --f3-schedule`. Use the step count and frame count you "
                                   "will generate with (a schedule for other ones is refused).")
    c.add_argument("images", type=Path, nargs="+", help="input images (image k uses seed + k)")
    c.add_argument("-o", "--output", type=Path, required=True, help="schedule file to write (.json)")
    _sampling_options(c, seed_help="image k uses seed + k; default: a random one, printed")
    c.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    i = add_subcommand(sub, "info", _info, help="describe a checkpoint",
                       description="Print a checkpoint's format, components, parameter counts and preset, and "
                                   "whether it holds everything generation needs.")
    i.add_argument("checkpoint", help="a .safetensors file, a diffusers folder or a preset name (not downloaded)")
    u = add_subcommand(sub, "ui", _ui, help="a web page to make videos (needs the extra: pip install 'svdlite[ui]')",
                       description="Load the model once and serve a web page (Gradio) to make videos with it, one "
                                   "run at a time, and the same as one HTTP endpoint, /generate. Listens on "
                                   "127.0.0.1 unless --host says otherwise; no share link.")
    u.add_argument("--model", default="svd-xt", help="as for generate (default: svd-xt)")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                       "only; 0.0.0.0 lets anyone who can reach it use the page)")
    u.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    u.add_argument("--device", default="auto", help="as for generate (default: auto)")
    u.add_argument("--dtype", choices=DTYPES, default="auto", help="as for generate (default: auto)")
    u.add_argument("--threads", type=int, help="CPU threads torch uses (default: torch's, one per core)")
    u.add_argument("--output-dir", type=Path, help="folder for the finished videos (its videos/) and the page's "
                                                   "uploads (its gradio-*/); nothing is written outside it "
                                                   "(default: a new temporary folder, removed at exit)")
    u.add_argument("-q", "--quiet", action="store_true", help="no progress bar while loading")
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
    g.add_argument("--cache-depth", type=int,
                   help="step caching: the branch recomputed at reusing steps, 0 = the shallowest (default 0 when "
                        "--cache-interval is above 1: the most work saved, and the balanced level's measured choice)")
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
    _sampling_options(b, seed_help="item NAME's seed is derived from it and NAME alone, recorded in the manifest; "
                                   "default: the seed of the run recorded in OUTDIR's manifest (a rerun resumes "
                                   "alike), else a random one, printed")
    _plan_options(b)
    b.add_argument("--decode-chunk-size", type=int)
    b.add_argument("--batch-size", type=int, default=1, help="videos per UNet evaluation (default 1)")
    b.add_argument("--format", choices=("mp4", "webm", "gif"), default="mp4", help="output format (default mp4)")
    b.add_argument("--overwrite", action="store_true", help="redo inputs whose output exists (default: skip them)")
    b.add_argument("--processes", type=int, default=1,
                   help="run N processes on this machine, each with its share, as torchrun would (on the GPU of "
                        "each process's rank, or the CPU with --threads split between them); one line per process "
                        "that ended badly (default 1)")
    b.add_argument("--no-lock", action="store_true", help=argparse.SUPPRESS)  # the copies of --processes N


def _sampling_options(p: argparse.ArgumentParser, seed_help: str = "default: a random one, printed") -> None:
    """The model, sampling and run options `generate`, `batch` and `calibrate` share, with one set of defaults."""
    p.add_argument("--model", default="svd-xt",
                   help="preset (svd, svd-xt, svd-xt-1.1, tiny), an original .safetensors file, a diffusers folder "
                        "or an svdlite converted file; presets are downloaded from the Hugging Face Hub "
                        "(default: svd-xt)")
    p.add_argument("--seed", type=int, help="random seed in [0, 2**64); the same seed, settings, machine and "
                                            f"--threads give the same file ({seed_help})")
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
                   help="cpu, cuda, cuda:N, mps, or auto: the GPU when there is one (under torchrun: the GPU of the "
                        "process's local rank), else the CPU (default: auto)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="precision of the UNet and CLIP; the VAE always runs in fp32 (default: auto, fp16 on a GPU "
                        "and fp32 on the CPU)")
    p.add_argument("--threads", type=int,
                   help="CPU threads torch uses (default: torch's, one per core); on a machine busy with other work "
                        "fewer run faster. The video depends on it in the last bits (float rounding)")
    p.add_argument("-q", "--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress bars (they are shown only when stderr is a terminal)")


TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _progress(args) -> bool:
    """Progress bars: on a terminal, unless --quiet."""
    return not args.quiet and sys.stderr.isatty()


def _run_checks(args) -> None:
    """The checks of the model name, device and thread count: before any model loads."""
    from .checkpoint_file import check_safetensors_file
    from .checks import resolve_device
    from .components import resolve_model_path
    from .presets import PRESETS

    if args.model not in PRESETS:
        path, _ = resolve_model_path(args.model)  # a path that does not exist is refused here (presets download later)
        if path.is_file():
            check_safetensors_file(path)  # a file that is not a complete safetensors checkpoint, from its header
    resolve_device(args.device)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive int, got {args.threads}")


def _load(args, device: str | None = None, announce: bool = True):
    """The model of `--model` on `--device` (or `device`) in `--dtype`, after a line saying what loads where."""
    import torch

    from .checks import resolve_device, resolve_dtype
    from .components import load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(device or args.device)
    dtype = resolve_dtype(getattr(torch, TORCH_DTYPES[args.dtype]) if args.dtype in TORCH_DTYPES else args.dtype,
                          device)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    offload = getattr(args, "offload", None) is not None
    where = f"cpu, each network moved to {device}{name} while it works" if offload else f"{device}{name}"
    if announce:
        print(f"loading {_model_line(args.model)} on {where}, {str(dtype).removeprefix('torch.')}, "
              f"{torch.get_num_threads()} CPU thread(s)")
    return load_model(args.model, device="cpu" if offload else device, dtype=dtype, progress=_progress(args))


def _spec(args):
    """The run's settings and options from the command line, checked once before any model loads (with a preset,
    its size multiple too; an F3 schedule read and fitted to the run's step and frame count)."""
    from .checks import check_settings
    from .run import RUN_KEYS, SETTING_KEYS, RunSpec

    given = {k: getattr(args, k, None) for k in RUN_KEYS}
    check_settings(**{k: given[k] for k in SETTING_KEYS if given[k] is not None}, seed=args.seed,
                   size_multiple=_size_multiple(args))
    spec = RunSpec.from_options(**given)
    spec.check_fit(args.model)
    return spec


def _size_multiple(args) -> int | None:
    from .presets import PRESETS

    return 64 if args.model in PRESETS else None  # every preset's network: 64; a file's is checked once loaded


def _calibrate(args) -> int:
    from .calibrate import calibrate_f3
    from .image import open_image
    from .outputs import exclusive, lock_path
    from .seeds import random_seed

    spec = _spec(args)
    if args.output.exists() and not args.force:
        raise FileExistsError(f"{args.output} exists; pass --force to overwrite it")
    if not args.output.parent.is_dir():
        raise FileNotFoundError(f"output folder {args.output.parent} does not exist")
    images = [open_image(path) for path in args.images]
    _run_checks(args)
    with exclusive(lock_path(args.output), f"output {args.output}"):
        seed = _announce_seed(args.seed, random_seed)
        schedule = calibrate_f3(images, model=_load(args), seed=seed, spec=spec, progress=_progress(args))
        schedule.save(args.output, overwrite=args.force)
    print(f"wrote {args.output} ({len(schedule.units)} temporal blocks x {schedule.num_steps} steps = "
          f"{schedule.num_units} units, {len(args.images)} image(s), seed {seed})")
    return 0


def _announce_seed(seed: int | None, draw) -> int:
    """The given seed, or a random one, printed with how to make the same output again."""
    if seed is None:
        seed = draw()
        print(f"seed: {seed} (pass --seed {seed} to make this again)")
    return seed


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
    from .image import open_image
    from .outputs import exclusive, lock_path
    from .pipeline import generate
    from .seeds import random_seed
    from .video import check_output

    spec = _spec(args)
    output = check_output(args.output, overwrite=args.force)
    if output.resolve() == args.image.resolve():
        raise ValueError(f"output {output} is the input image; choose another output file")
    image = open_image(args.image)
    _run_checks(args)
    with exclusive(lock_path(output), f"output {output}"):
        seed = _announce_seed(args.seed, random_seed)
        video = generate(image, model=_load(args), spec=spec, seed=seed, progress=_progress(args),
                         offload=args.offload, device=args.device if args.offload else None)
        video.save(output, overwrite=args.force)
    print(f"wrote {output} ({len(video)} frames, {video.width}x{video.height} (width x height), {video.fps:g} fps, "
          f"seed {seed})")
    return 0


def _batch(args) -> int:
    from .batch import Dist, check_outdir, discover_inputs, pick_device, run_batch
    from .outputs import exclusive, lock_path

    spec = _spec(args)
    discover_inputs(args.inputs)  # before the loading line: missing inputs, empty folders and lists are refused
    _run_checks(args)
    if args.processes < 1:
        raise ValueError(f"--processes must be a positive int, got {args.processes}")
    check_outdir(args.output)
    dist = Dist.from_env()
    locked = args.no_lock or dist.rank != 0  # the lock is rank 0's (or the launching process's)
    with nullcontext() if locked else exclusive(lock_path(args.output), f"output folder {args.output}"):
        if args.processes > 1 and "RANK" not in os.environ:
            return _launch(args)
        device = pick_device(args.device, dist)  # the GPU of this process's local rank, when there are GPUs
        model = _load(args, device=device, announce=dist.rank == 0)
        summary = run_batch(args.inputs, args.output, model=model, seed=args.seed, batch_size=args.batch_size,
                            overwrite=args.overwrite, video_format=args.format, device=device, dist=dist,
                            progress=_progress(args), lock=False, spec=spec)
    if summary["rank"] == 0:
        minutes = summary["seconds"] / 60
        rate = f", {summary['done'] / minutes:.2f} videos/min" if summary["done"] and minutes > 0 else ""
        print(f"{summary['done']} done, {summary['failed']} failed, {summary['skipped']} skipped (output existed) "
              f"in {summary['seconds']:.1f} s on {summary['world_size']} process(es){rate}, seed {summary['seed']}; "
              f"manifest: {args.output / 'manifest.jsonl'}")
    return 1 if summary["failed"] else 0


def _launch(args) -> int:
    """`batch --processes N`: the run's seed decided here (every copy uses it), then N copies of the command."""
    from .batch import run_seed
    from .launch import run_copies

    seed, origin = run_seed(args.output, args.seed)
    print(f"seed: {seed} ({origin})")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.processes)  # no oversubscribed cores
    return run_copies([*args.argv, "--processes", "1", "--seed", str(seed), "--threads", str(threads), "--no-lock"],
                      args.processes)


def _info(args) -> int:
    from .info import describe

    for line in describe(args.checkpoint):
        print(line)
    return 0


def _ui(args) -> int:
    from .ui import serve  # Gradio is imported there, only by this subcommand

    return serve(args, check=_run_checks, load=_load)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv  # `batch --processes N` runs the same command N times
    return run_cleanly(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
