#!/usr/bin/env python3
"""Write a tiny random diffusers `UNetSpatioTemporalConditionModel` and its outputs, for tests/test_unet_diffusers.py.

Deterministic: seeded weights (every tensor live, like tests/reference/materialize.py's recipe), rounded to
float16 and saved in diffusers layout with the fp16 variant name, so the test also exercises `.fp16` loading;
the outputs are computed in float32 from exactly those rounded weights.

    python tools/make_diffusers_unet_reference.py OUT_DIR [--force]     (the test's files: OUT_DIR tests/data)

Writes OUT_DIR/diffusers_unet_tiny/ (config.json, diffusion_pytorch_model.fp16.safetensors) and
OUT_DIR/diffusers_unet_tiny_io.safetensors. Needs diffusers (the `test` extra).
"""
import argparse
import math
import sys
from pathlib import Path

import torch
from svdlite.outputs import add_force, atomic_file, atomic_folder, check_outputs
from safetensors.torch import save_file


CONFIG = dict(
    sample_size=8, in_channels=8, out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
    up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
    block_out_channels=(32, 32, 64, 64), addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
    layers_per_block=1, cross_attention_dim=48, transformer_layers_per_block=1, num_attention_heads=(2, 2, 4, 4),
    num_frames=3,
)
BATCH, FRAMES, HEIGHT, WIDTH = 2, 3, 8, 16
MODEL, IO = "diffusers_unet_tiny", "diffusers_unet_tiny_io.safetensors"  # the outputs' names in OUT_DIR


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        r = torch.randn(p.shape, generator=g)
        if name.endswith("mix_factor"):
            v = 0.3 + 0.5 * r
        elif p.ndim == 1 and name.endswith("weight"):
            v = 1.0 + 0.1 * r
        elif name.endswith("bias"):
            v = 0.05 * r
        else:
            v = r / math.sqrt(math.prod(p.shape[1:]))
        p.data.copy_(v.half().float())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=f"outputs: OUT_DIR/{MODEL}/ and OUT_DIR/{IO}; exit codes: 0 written, "
                                            "2 refused (an output exists without --force, or OUT_DIR is missing)")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="an existing folder (the test's: tests/data)")
    add_force(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.out_dir
    check_outputs(parser, [out / MODEL, out / IO], args.force)
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(**CONFIG).eval()
    randomize(unet, 1234)
    # both outputs are renamed into place together at the end, after everything is computed
    with atomic_folder(out / MODEL) as folder, atomic_file(out / IO) as io_file:
        unet.half().save_pretrained(folder, variant="fp16")
        unet.float()
        g = torch.Generator().manual_seed(99)
        sample = torch.randn(BATCH, FRAMES, CONFIG["in_channels"], HEIGHT, WIDTH, generator=g)
        sigma = torch.tensor([0.5, 20.0])
        timestep = 0.25 * sigma.log()
        context = torch.randn(BATCH, 1, CONFIG["cross_attention_dim"], generator=g)
        added_time_ids = torch.tensor([[6.0, 127.0, 0.02], [5.0, 30.0, 0.1]])
        with torch.no_grad():
            result = unet(sample, timestep, context, added_time_ids, return_dict=False)[0]
            # diffusers uses GroupNorm eps 1e-6 in some ResBlocks where the original (and svdlite) use 1e-5
            # (docs/model.md "Numerics"); `out_sgm_eps` is the same network with the original's eps everywhere.
            for name, module in unet.named_modules():
                if isinstance(module, torch.nn.GroupNorm) and ".resnets." in f".{name}." and module.eps != 1e-5:
                    module.eps = 1e-5
            result_sgm_eps = unet(sample, timestep, context, added_time_ids, return_dict=False)[0]
        save_file({"sample": sample, "timestep": timestep, "encoder_hidden_states": context,
                   "added_time_ids": added_time_ids, "out": result.contiguous(),
                   "out_sgm_eps": result_sgm_eps.contiguous()}, str(io_file))
    print(f"wrote {out / MODEL} and {out / IO}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
