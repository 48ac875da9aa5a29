"""Full size: an SVD-XT-shaped original file (random fp16 weights with the shapes of tests/keymaps) converts,
the converted file holds exactly the expected parameters, and both give the same UNet output.

Writes ~4.5 GB (source) + ~4.4 GB (converted) into a temporary folder that is deleted afterwards, and needs ~12 GB
of memory: the `slow` part of the suite (`python -m pytest -m slow`).
"""
import csv
import gc
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from svdlite import load_unet
from svdlite.testing import random_tensors

from helpers import KEYMAPS, load_tool

convert_weights = load_tool("convert_weights")
pytestmark = pytest.mark.slow

EXPECTED = {"unet": 1_449_502_442, "vae_encoder": 34_163_592 + 72, "vae_decoder": 63_579_183,
            "image_encoder": 632_076_800}  # vae_encoder: encoder + quant_conv (8*8 + 8)


def keymap_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, column in (("svd_unet_key_map.tsv", "shape"), ("svd_vae_key_map.tsv", "sgm_shape"),
                         ("svd_clip_visual_keys.tsv", "shape")):
        with open(KEYMAPS / name) as f:
            for row in csv.DictReader(f, delimiter="\t"):
                shapes[row["sgm_key"]] = tuple(json.loads(row[column]))
    return shapes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fullsize")
    free = shutil.disk_usage(folder).free
    assert free > 12e9, f"this test writes ~9 GB into {folder}, which has only {free / 1e9:.1f} GB free"
    src, out = folder / "svd_xt.safetensors", folder / "svd_xt.svdlite.safetensors"
    save_file(random_tensors(keymap_shapes(), seed=0, dtype=torch.float16), str(src))
    gc.collect()
    assert convert_weights.main([str(src), str(out)]) == 0
    yield src, out
    shutil.rmtree(folder)


def test_converted_file_holds_exactly_the_vcut_parameters(files):
    _, out = files
    counts = {}
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["preset"] == "svd-xt"
        for key in f.keys():
            component = key.split(".", 1)[0]
            counts[component] = counts.get(component, 0) + torch.Size(f.get_slice(key).get_shape()).numel()
            assert ".attn2." not in key
    assert counts == EXPECTED


def test_converted_and_original_give_the_same_unet_output(files):
    src, out = files
    g = torch.Generator().manual_seed(0)
    t = 2
    x, ctx = torch.randn(t, 8, 8, 8, generator=g), torch.randn(t, 1, 1024, generator=g)
    y, ts = torch.randn(t, 768, generator=g), torch.full((t,), 0.5)
    outputs = []
    for path in (src, out):
        unet = load_unet(path)
        with torch.no_grad():
            outputs.append(unet(x, ts, ctx, y, t))
        del unet
        gc.collect()
    a, b = outputs
    rel = ((a - b).abs().max() / b.abs().max()).item()
    print(f"full-size converted vs original UNet output: max rel diff {rel:.2e}")
    # the converted file stores the fold W_out W_v (float32 product of the fp16 inputs) rounded to fp16 (2^-11
    # relative); the original path applies W_v then W_out in float32
    assert rel < 1e-2
