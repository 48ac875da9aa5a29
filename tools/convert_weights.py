#!/usr/bin/env python3
"""Convert an SVD checkpoint to svdlite's own file.

    python tools/convert_weights.py SRC OUT [--dtype fp16|bf16|fp32] [--preset P] [--force]

SRC: an original single file (svd.safetensors, svd_xt.safetensors, svd_xt_1_1.safetensors, ...) or a diffusers
pipeline folder (unet/, vae/, image_encoder/). OUT holds the folded cross-attention projections instead of any
attn2 tensor, none of the tensors svdlite never uses, and metadata (format version, preset, source sha256,
svdlite version). OUT is written to a temporary file, reloaded and checked, then renamed; an existing OUT is
only replaced with --force, and a failed conversion leaves nothing behind.
"""
import argparse
import sys
from pathlib import Path

import torch

from svdlite.errors import run_cleanly
from svdlite.formats import open_model_source
from svdlite.convert import convert
from svdlite.presets import PRESETS

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def convert_command(args) -> int:
    if args.out.exists() and not args.force:
        raise FileExistsError(f"{args.out} exists; pass --force to overwrite it")
    if args.out.resolve() == args.src.resolve():
        raise ValueError(f"OUT must differ from SRC ({args.src})")
    source = open_model_source(args.src, args.preset, require_all=False)
    print(f"source: {args.src} ({source.fmt} format, preset {source.preset})")
    convert(source, args.out, dtype=DTYPES[args.dtype], force=args.force, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="exit codes: 0 done, 1 failed while converting, 2 refused (bad source, "
                                       "existing OUT), 130 Ctrl-C, 143 SIGTERM")
    p.add_argument("src", type=Path, help="original .safetensors file or diffusers folder")
    p.add_argument("out", type=Path, help="svdlite .safetensors file to write")
    p.add_argument("--dtype", choices=DTYPES, default="fp16", help="stored dtype (default fp16)")
    p.add_argument("--preset", choices=[k for k in PRESETS], default=None,
                   help="sampling defaults to record (default: guessed from the source's name / config)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def main(argv=None) -> int:
    """Exit codes as the `svdlite` command's (`svdlite.errors.run_cleanly`): 0 done, 1 failed while converting, 2
    refused (bad source checkpoint, existing OUT without --force), 130 Ctrl-C, 143 SIGTERM; the temporary file is
    removed."""
    return run_cleanly(convert_command, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
