"""CLIP image encoder (svdlite/clip.py, svdlite/clip_keymap.py) against transformers and diffusers.

References, all float32 on CPU, nothing downloaded (errors measured with torch 2.14.1, transformers 5.23.0,
diffusers 0.42.1):
* a tiny transformers `CLIPVisionModelWithProjection` (hidden 64, 2 layers, 4 heads, MLP 256, patch 14,
  projection 32, exact "gelu", eager attention) with seeded random weights, mapped into our open_clip tower:
  `image_embeds` worst abs error 0.0 at image 56 (values up to ~3.0) and 4.8e-7 through the whole
  `encode_image` path at image 224 from a 576x1024 input (values up to ~2.3); tolerance atol 1e-5, rtol 1e-5;
* diffusers' `_resize_with_antialiasing` (its copy of kornia's resize, as sgm calls it) + transformers'
  `CLIPImageProcessor` normalisation, i.e. the SVD pipeline's preprocessing: worst abs error 0.0 (bitwise equal)
  on normalised values up to ~2.9 for 576x1024, 1024x576, 300x200, 100x500, 64x96 and 224x224 inputs;
  tolerance atol 1e-6, rtol 1e-6 (float32 rounding headroom for other CPUs);
* the full-size key table `tests/keymaps/svd_clip_visual_keys.tsv` (392 tensors, 632,076,800 params).
"""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import KEYMAPS, random_tensors
from svdlite.clip import (CLIP_MEAN, CLIP_STD, CLIPVisionConfig, _gaussian_kernel, build_image_encoder,
                          encode_image, preprocess)
from svdlite.clip_keymap import (IGNORED_TRANSFORMERS_KEYS, ORIGINAL_PREFIX, key_table, openclip_from_transformers,
                                 transformers_from_openclip, transformers_keys)

transformers = pytest.importorskip("transformers")
KEYMAP_TSV = KEYMAPS / "svd_clip_visual_keys.tsv"

# diffusers `image_encoder/config.json` values for SVD (docs/model.md "Checkpoints and key names")
SVD_TRANSFORMERS_CONFIG = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "num_hidden_layers": 32,
    "patch_size": 14, "image_size": 224, "projection_dim": 1024, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    "num_channels": 3, "model_type": "clip_vision_model",
}
TINY_TRANSFORMERS_CONFIG = {
    "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2,
    "patch_size": 14, "image_size": 56, "projection_dim": 32, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
}


def tiny_pair(image_size: int = 56, seed: int = 0):
    """(transformers model, our tower, config): the same seeded random weights in both layouts."""
    hf_config = transformers.CLIPVisionConfig(**{**TINY_TRANSFORMERS_CONFIG, "image_size": image_size},
                                              attn_implementation="eager")  # explicit softmax reference
    torch.manual_seed(seed)
    hf = transformers.CLIPVisionModelWithProjection(hf_config).eval()
    assert hf.config._attn_implementation == "eager"
    shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    hf.load_state_dict(random_tensors(shapes, seed), strict=True)
    config = CLIPVisionConfig.from_transformers(hf_config.to_dict())
    with torch.device("meta"):
        ours = build_image_encoder(config)
    ours.load_state_dict(openclip_from_transformers(hf.state_dict(), config), strict=True, assign=True)
    return hf, ours.eval(), config


def diffusers_preprocess(image: torch.Tensor) -> torch.Tensor:
    """The SVD pipeline's CLIP input for an image in [-1, 1] (`StableVideoDiffusionPipeline._encode_image`)."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

    x = (_resize_with_antialiasing(image, (224, 224)) + 1.0) / 2.0
    processor = transformers.CLIPImageProcessor()
    return processor(images=x, do_normalize=True, do_center_crop=False, do_resize=False, do_rescale=False,
                     return_tensors="pt").pixel_values


def test_transformers_reference_is_the_sgm_architecture():
    """transformers' CLIP vision tower has ln_pre (`pre_layrnorm`), eps 1e-5 and, for "gelu", erf GELU."""
    hf, _, _ = tiny_pair()
    vm = hf.vision_model
    assert isinstance(vm.pre_layrnorm, nn.LayerNorm) and vm.pre_layrnorm.eps == 1e-5
    assert all(m.eps == 1e-5 for m in hf.modules() if isinstance(m, nn.LayerNorm))
    assert vm.embeddings.patch_embedding.bias is None and hf.visual_projection.bias is None
    act = vm.encoder.layers[0].mlp.activation_fn
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    torch.testing.assert_close(act(x), x * 0.5 * (1 + torch.erf(x / math.sqrt(2))), atol=1e-15, rtol=0)
    # transformers' default activation differs, so a config.json without hidden_act must be rejected
    assert transformers.CLIPVisionConfig().hidden_act == "quick_gelu"


@torch.no_grad()
def test_tiny_tower_matches_transformers():
    hf, ours, config = tiny_pair()
    assert config == CLIPVisionConfig(image_size=56, patch_size=14, width=64, layers=2, heads=4, mlp_ratio=4.0,
                                      output_dim=32)
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    expected = hf(pixel_values=pixels).image_embeds
    got = ours(pixels)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_encode_image_matches_diffusers_pipeline_path():
    """Whole path at 224: 576x1024 image in [-1, 1] -> (N, 1, D), vs diffusers resize + processor + transformers."""
    hf, ours, _ = tiny_pair(image_size=224)
    image = torch.rand(2, 3, 576, 1024, generator=torch.Generator().manual_seed(2)) * 2 - 1
    expected = hf(pixel_values=diffusers_preprocess(image)).image_embeds[:, None]
    got = encode_image(ours, image)
    assert got.shape == (2, 1, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hw", [(576, 1024), (1024, 576), (300, 200), (100, 500), (64, 96), (224, 224)])
def test_preprocess_matches_diffusers(hw):
    image = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(hw[0] * 7 + hw[1])) * 2 - 1
    got = preprocess(image)
    assert got.shape == (2, 3, 224, 224) and got.dtype == torch.float32
    torch.testing.assert_close(got, diffusers_preprocess(image), atol=1e-6, rtol=1e-6)


def test_preprocess_constants_and_kernels():
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert CLIP_MEAN == tuple(OPENAI_CLIP_MEAN) and CLIP_STD == tuple(OPENAI_CLIP_STD)
    # 576x1024 -> 224: sigma (0.786, 1.786), kernel (3, 7) (docs/model.md "Conditioning")
    assert _gaussian_kernel((576 / 224 - 1) / 2, torch.float32, torch.device("cpu")).numel() == 3
    assert _gaussian_kernel((1024 / 224 - 1) / 2, torch.float32, torch.device("cpu")).numel() == 7
    assert _gaussian_kernel(0.001, torch.float32, torch.device("cpu")).tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="N, 3, H, W"):
        preprocess(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="floating-point"):
        preprocess(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_full_size_tower_matches_checkpoint_keymap():
    rows = [line.split("\t") for line in KEYMAP_TSV.read_text().splitlines()[1:] if line.strip()]
    expected = {key.removeprefix(ORIGINAL_PREFIX): tuple(int(d) for d in shape.strip("[]").split(","))
                for key, shape in rows}
    assert all(key.startswith(ORIGINAL_PREFIX) for key, _ in rows)
    with torch.device("meta"):
        model = build_image_encoder(CLIPVisionConfig())
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert len(sd) == 392 and sum(v.numel() for v in sd.values()) == 632_076_800
    assert all(t.is_meta for t in sd.values()) and not list(model.buffers())


def test_key_table_round_trips_every_key():
    hf, ours, config = tiny_pair()
    hf_sd = hf.state_dict()
    assert sorted(transformers_keys(config)) == sorted(set(hf_sd) - set(IGNORED_TRANSFORMERS_KEYS))
    mapped = openclip_from_transformers(hf_sd, config)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    back = transformers_from_openclip(mapped, config)
    assert back.keys() == set(transformers_keys(config))
    for key, value in back.items():
        assert torch.equal(value, hf_sd[key]), key
    # the transforms that are not copies, spelled out
    w = "vision_model.encoder.layers.1.self_attn.{}_proj.weight"
    torch.testing.assert_close(mapped["transformer.resblocks.1.attn.in_proj_weight"],
                               torch.cat([hf_sd[w.format(p)] for p in "qkv"]), atol=0, rtol=0)
    torch.testing.assert_close(mapped["proj"], hf_sd["visual_projection.weight"].T, atol=0, rtol=0)
    # full size: 8 global rows + 12 per layer -> 392 OpenCLIP keys from 8 + 16 * 32 = 520 transformers keys
    full = CLIPVisionConfig()
    assert len(key_table(full)) == 392 and len(set(transformers_keys(full))) == 520


def test_getter_reads_only_the_needed_keys():
    hf, ours, config = tiny_pair()
    sd, read = hf.state_dict(), []

    def get(key):
        read.append(key)
        return sd[key]

    mapped = openclip_from_transformers(get, config)
    assert sorted(read) == sorted(transformers_keys(config)) and len(read) == len(set(read))
    assert mapped.keys() == ours.state_dict().keys()


def test_mapping_is_strict():
    hf, _, config = tiny_pair()
    sd = dict(hf.state_dict())
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # old transformers files: ignored
    openclip_from_transformers(sd, config)
    missing = {k: v for k, v in sd.items() if k != "vision_model.encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"1 missing .*layers\.1\.mlp\.fc2\.bias"):
        openclip_from_transformers(missing, config)
    with pytest.raises(ValueError, match=r"1 unexpected .*text_projection\.weight"):
        openclip_from_transformers({**sd, "text_projection.weight": torch.zeros(1)}, config)
    wrong_layers = CLIPVisionConfig(image_size=56, width=64, layers=3, heads=4, output_dim=32)
    with pytest.raises(ValueError, match=r"missing .*layers\.2\."):
        openclip_from_transformers(sd, wrong_layers)


def test_config_from_transformers_and_validation():
    assert CLIPVisionConfig.from_transformers(SVD_TRANSFORMERS_CONFIG) == CLIPVisionConfig()
    assert CLIPVisionConfig.from_transformers({"vision_config": SVD_TRANSFORMERS_CONFIG}) == CLIPVisionConfig()
    assert CLIPVisionConfig.from_transformers({**SVD_TRANSFORMERS_CONFIG, "patch_size": [14, 14]}).patch_size == 14
    for bad, match in [({"hidden_act": "quick_gelu"}, "quick_gelu"), ({"hidden_act": "gelu_new"}, "gelu_new"),
                       ({"layer_norm_eps": 1e-6}, "1e-06"), ({"num_channels": 4}, "num_channels=4"),
                       ({"image_size": [224, 256]}, "square"),
                       # int(52 * (107 / 52)) == 106: open_clip's int(width * mlp_ratio) cannot give 107
                       ({"hidden_size": 52, "num_attention_heads": 4, "intermediate_size": 107}, "107")]:
        with pytest.raises(ValueError, match=match):
            CLIPVisionConfig.from_transformers({**SVD_TRANSFORMERS_CONFIG, **bad})
    no_act = {k: v for k, v in SVD_TRANSFORMERS_CONFIG.items() if k != "hidden_act"}
    with pytest.raises(ValueError, match="missing.*quick_gelu"):
        CLIPVisionConfig.from_transformers(no_act)
    for bad, match in [({"width": 1000}, "heads=16"), ({"image_size": 225}, "225"), ({"layers": 0}, "layers"),
                       ({"mlp_ratio": -1.0}, "mlp_ratio"), ({"heads": 16.0}, "heads")]:
        with pytest.raises(ValueError, match=match):
            CLIPVisionConfig(**bad)
    c = CLIPVisionConfig()
    assert (c.head_dim, c.grid_size, c.num_positions, c.mlp_width) == (80, 16, 257, 5120)


def test_import_does_not_load_open_clip():
    code = "import sys, svdlite.clip, svdlite.clip_keymap; print('open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def test_a_torchvision_built_for_another_torch_is_named_with_both_versions(fail_open_clip_import):
    """open_clip imports torchvision, whose import fails with `operator torchvision::nms does not exist` when it was
    built for another torch: building the image encoder then says which versions are installed and what to do."""
    from importlib.metadata import version

    from svdlite.clip import TorchvisionMismatchError

    fail_open_clip_import("operator torchvision::nms does not exist")
    with pytest.raises(TorchvisionMismatchError) as info, torch.device("meta"):
        build_image_encoder(CLIPVisionConfig(layers=1))
    message = str(info.value)
    torch_version, torchvision_version = version("torch"), version("torchvision")
    assert isinstance(info.value, RuntimeError) and isinstance(info.value.__cause__, RuntimeError)
    assert f"the installed torchvision {torchvision_version} was built for another torch" in message, message
    assert f"than the installed torch {torch_version}" in message and "torchvision::nms does not exist" in message
    assert f"pip install torch=={torch_version} torchvision==<that release>" in message
    assert "https://pytorch.org/get-started/previous-versions/" in message

    fail_open_clip_import("something else")
    with pytest.raises(RuntimeError, match="^something else$"), torch.device("meta"):
        build_image_encoder(CLIPVisionConfig(layers=1))
