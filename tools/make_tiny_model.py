#!/usr/bin/env python3
"""Write the bundled `tiny` model: random weights with SVD's exact structure at tiny width (svdlite file format).

    python tools/make_tiny_model.py [OUT]    (default svdlite/assets/tiny.safetensors)

Deterministic (fixed seeds, svdlite.testing.random_tensors), float16. It exists so `svdlite generate --model tiny`
runs end to end on a CPU in seconds: it exercises every stage (CLIP, VAE encode, UNet with guidance, temporal
decoder, video file) but its weights are random, so it PRODUCES NOISE, NOT VIDEO.
"""
import dataclasses
import sys
from pathlib import Path

import torch

from svdlite.clip import CLIPVisionConfig, build_image_encoder
from svdlite.components import COMPONENTS, SVDLITE_PREFIXES
from svdlite.convert import write_svdlite
from svdlite.testing import random_tensors
from svdlite.unet import UNetConfig, VideoUNet
from svdlite.vae import ConditionEncoder, VAEConfig, VideoDecoder
from svdlite import __version__
import json

UNET = UNetConfig(model_channels=32, channel_mult=(1, 1, 1, 1), num_head_channels=16, context_dim=64)
VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1))
CLIP = CLIPVisionConfig(width=64, layers=2, heads=4, patch_size=32, output_dim=64)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "svdlite/assets/tiny.safetensors"
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
    write_svdlite(out, tensors, metadata, force=True)
    print(f"wrote {out}: {sum(v.numel() for v in tensors.values()):,} parameters (random: produces noise, not video)")


if __name__ == "__main__":
    main()
