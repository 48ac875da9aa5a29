#!/usr/bin/env python3
"""Write the bundled `tiny` model: random weights with SVD's exact structure at tiny width (svdlite file format).

    python tools/make_tiny_model.py OUT [--force]
    python tools/make_tiny_model.py svdlite/assets/tiny.safetensors --force    (the bundled file, byte for byte)

Deterministic: fixed seeds (svdlite.testing.random_tensors), float16, and svdlite's own writer
(svdlite.convert.write_svdlite: header and tensor order fixed, data 64-byte aligned), so the output is the same
bytes on every run and equals the bundled svdlite/assets/tiny.safetensors (its metadata records the svdlite version,
so a new version's output differs by that string until the asset is written again). It exists so
`svdlite generate --model tiny` runs end to end on a CPU in seconds: it exercises every stage (CLIP, VAE encode,
UNet with guidance, temporal decoder, video file) but its weights are random, so it PRODUCES NOISE, NOT VIDEO.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from svdlite import __version__
from svdlite.clip import CLIPVisionConfig, build_image_encoder
from svdlite.formats import COMPONENTS, SVDLITE_PREFIXES
from svdlite.convert import write_svdlite
from svdlite.testing import random_tensors
from svdlite.unet import UNetConfig, VideoUNet
from svdlite.vae import ConditionEncoder, VAEConfig, VideoDecoder
from svdlite.outputs import add_force, check_outputs

TOOLS = Path(__file__).resolve().parent

UNET = UNetConfig(model_channels=32, channel_mult=(1, 1, 1, 1), num_head_channels=16, context_dim=64)
VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1))
CLIP = CLIPVisionConfig(width=64, layers=2, heads=4, patch_size=32, output_dim=64)
BUNDLED = TOOLS.parent / "svdlite" / "assets" / "tiny.safetensors"


def tiny_model() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tiny model's tensors (svdlite keys, float16) and metadata."""
    with torch.device("meta"):
        modules = {"unet": VideoUNet(UNET), "vae_encoder": ConditionEncoder(VAE), "vae_decoder": VideoDecoder(VAE),
                   "image_encoder": build_image_encoder(CLIP)}
    tensors = {}
    for seed, name in enumerate(COMPONENTS):
        shapes = {k: tuple(v.shape) for k, v in modules[name].state_dict().items()}
        tensors.update({SVDLITE_PREFIXES[name] + k: v for k, v in random_tensors(shapes, seed, torch.float16).items()})
    metadata = {"unet_config": json.dumps(UNET.to_dict()), "vae_config": json.dumps(dataclasses.asdict(VAE)),
                "clip_config": json.dumps(dataclasses.asdict(CLIP)), "components": ",".join(COMPONENTS),
                "preset": "tiny", "source": "tools/make_tiny_model.py (random weights)", "source_sha256": "",
                "svdlite_version": __version__, "dtype": "float16"}
    return tensors, metadata


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=f"the bundled file: {BUNDLED.relative_to(TOOLS.parent)}; "
                                            "exit codes: 0 written, 2 refused (OUT exists without --force, or its "
                                            "folder is missing)")
    parser.add_argument("out", type=Path, metavar="OUT", help="the .safetensors file to write")
    add_force(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_outputs(parser, [args.out], args.force)
    tensors, metadata = tiny_model()
    write_svdlite(args.out, tensors, metadata, force=args.force)  # temporary file, reloaded and checked, renamed
    print(f"wrote {args.out}: {sum(v.numel() for v in tensors.values()):,} parameters (random: produces noise, "
          "not video)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
