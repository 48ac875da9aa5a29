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

from svdlite.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, sigterm_raises
from svdlite.components import open_model_source
from svdlite.convert import convert
from svdlite.presets import PRESETS

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="original .safetensors file or diffusers folder")
    p.add_argument("out", type=Path, help="svdlite .safetensors file to write")
    p.add_argument("--dtype", choices=DTYPES, default="fp16", help="stored dtype (default fp16)")
    p.add_argument("--preset", choices=[k for k in PRESETS], default=None,
                   help="sampling defaults to record (default: guessed from the source's name / config)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    if args.out.resolve() == args.src.resolve():
        print("error: OUT must differ from SRC", file=sys.stderr)
        return 2
    try:
        with sigterm_raises():  # Ctrl-C and SIGTERM unwind, so the temporary file is removed
            source = open_model_source(args.src, args.preset, require_all=False)
            print(f"source: {args.src} ({source.fmt} format, preset {source.preset})")
            convert(source, args.out, dtype=DTYPES[args.dtype], force=args.force, progress=not args.no_progress)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("terminated; nothing was written", file=sys.stderr)
        return EXIT_TERMINATED
    return 0


if __name__ == "__main__":
    sys.exit(main())
