"""VideoUNet structure, config validation, the loader's key coverage at full size (meta device) and its errors."""
import csv
import dataclasses

import pytest
import torch

from helpers import KEYMAPS, TINY, original_unet_shapes, write_original_unet
from svdlite import UNetConfig, VideoUNet
from svdlite.attention import attention, attention_reference
from svdlite.checkpoint_file import CheckpointError
from svdlite.loading import load_unet
from svdlite.read_plans import expected_unet_source_keys
from svdlite.unet_keymap import ORIGINAL_PREFIX


def test_full_size_parameter_count():
    # original 1,524,623,082 - all cross-attention (100,704,640) + folded projections (25,584,000)
    with torch.device("meta"):
        unet = VideoUNet(UNetConfig())
    assert sum(p.numel() for p in unet.parameters()) == 1_449_502_442
    assert sum(p.numel() for n, p in unet.named_parameters() if "attn2_fold" in n) == 25_584_000


def test_original_network_shapes_match_the_spec():
    shapes = original_unet_shapes(UNetConfig())
    assert len(shapes) == 1428
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 1_524_623_082


def test_loader_key_lists_cover_the_full_size_keymap():
    rows = list(csv.DictReader(open(KEYMAPS / "svd_unet_key_map.tsv"), delimiter="\t"))
    never_read = [r for r in rows if ".attn2.to_q." in r["sgm_key"] or ".attn2.to_k." in r["sgm_key"]]
    assert len(never_read) == 64
    read = [r for r in rows if r not in never_read]
    assert expected_unet_source_keys("original") == {r["sgm_key"] for r in read}
    assert expected_unet_source_keys("diffusers") == {r["diffusers_key"] for r in read}


def test_config_from_sgm_params_and_validation():
    params = {"target": "x", "model_channels": 32, "channel_mult": [1, 2, 4, 4], "num_head_channels": 16,
              "spatial_transformer_attn_type": "softmax", "use_checkpoint": False, "num_classes": "sequential"}
    cfg = UNetConfig.from_dict(params)
    assert cfg.channel_mult == (1, 2, 4, 4) and cfg.model_channels == 32
    with pytest.raises(ValueError, match="model_channels"):
        UNetConfig(model_channels=0)
    with pytest.raises(ValueError, match="num_head_channels"):
        UNetConfig(model_channels=96, num_head_channels=64)
    with pytest.raises(ValueError, match="merge_strategy"):
        UNetConfig(merge_strategy="fixed")
    with pytest.raises(ValueError, match="multiple of 32"):
        UNetConfig(model_channels=16, num_head_channels=16)


def test_sdpa_equals_explicit_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 17, 16, generator=g) for _ in range(3))
    # float32 summation-order noise only
    torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_forward_rejects_bad_shapes():
    torch.manual_seed(0)
    unet = VideoUNet(TINY).eval()
    x = torch.randn(4, 8, 8, 8)
    ok = dict(timesteps=torch.zeros(4), y=torch.zeros(4, 12), num_video_frames=2)
    with pytest.raises(ValueError, match="single CLIP token"):
        unet(x, context=torch.zeros(4, 3, 24), **ok)
    with pytest.raises(ValueError, match="multiple of num_video_frames"):
        unet(x, context=torch.zeros(4, 1, 24), **{**ok, "num_video_frames": 3})
    with pytest.raises(ValueError, match="latent size"):
        unet(torch.randn(4, 8, 7, 8), context=torch.zeros(4, 1, 24), **ok)


def test_loads_original_and_never_reads_query_key(tmp_path):
    write_original_unet(tmp_path / "u.safetensors", TINY)
    unet, src = load_unet(tmp_path / "u.safetensors", TINY, return_source=True)
    assert not any(".attn2.to_q." in k or ".attn2.to_k." in k for k in src.reads)
    assert len(src.reads) == len(set(src.reads)) == len(expected_unet_source_keys("original", TINY))
    assert not any(p.is_meta or p.requires_grad for p in unet.parameters())


def _error(tmp_path, edit) -> str:
    path = tmp_path / "u.safetensors"
    write_original_unet(path, TINY, edit=edit)
    with pytest.raises(CheckpointError) as info:
        load_unet(path, TINY)
    return str(info.value)


def test_error_missing_key(tmp_path):
    key = ORIGINAL_PREFIX + "input_blocks.1.0.in_layers.0.weight"
    msg = _error(tmp_path, lambda t: t.pop(key))
    assert "1 missing" in msg and key in msg


def test_error_unexpected_key(tmp_path):
    key = ORIGINAL_PREFIX + "input_blocks.1.0.extra.weight"
    msg = _error(tmp_path, lambda t: t.__setitem__(key, torch.zeros(3)))
    assert "1 unexpected" in msg and key in msg


def test_error_wrong_shape(tmp_path):
    key = ORIGINAL_PREFIX + "out.2.weight"
    msg = _error(tmp_path, lambda t: t.__setitem__(key, torch.zeros(5, 32, 3, 3)))
    assert key in msg and "(5, 32, 3, 3)" in msg and "(4, 32, 3, 3)" in msg


def test_error_wrong_config_names_shapes(tmp_path):
    write_original_unet(tmp_path / "u.safetensors", TINY)
    with pytest.raises(CheckpointError, match="model_channels=320"):
        load_unet(tmp_path / "u.safetensors", UNetConfig())


def test_network_read_from_an_original_files_shapes(tmp_path):
    """Without a config, an original file's network is read from its shapes (formats.open_model_source, the one
    answer for load_model, load_unet, conversion and info). Head width is not in the shapes: SVD's 64 is taken; a
    network whose widths it does not divide is refused with what to pass."""
    wide = dataclasses.replace(TINY, model_channels=64, num_head_channels=64)
    write_original_unet(tmp_path / "wide.safetensors", wide)
    assert load_unet(tmp_path / "wide.safetensors").config == wide
    write_original_unet(tmp_path / "u.safetensors", TINY)
    with pytest.raises(CheckpointError, match=r"not a multiple of num_head_channels 64.*config=UNetConfig"):
        load_unet(tmp_path / "u.safetensors")


def test_error_not_safetensors(tmp_path):
    path = tmp_path / "svd.ckpt"
    path.write_bytes(b"PK\x03\x04 a pickle zip, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="is a PyTorch zip/pickle checkpoint .*, not safetensors"):
        load_unet(path, TINY)


def test_error_truncated_file(tmp_path):
    path = tmp_path / "u.safetensors"
    write_original_unet(path, TINY)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_unet(path, TINY)


def test_error_stable_diffusion_image_unet(tmp_path):
    temporal = (".time_stack.", ".time_mixer.", ".time_pos_embed.")
    msg = _error(tmp_path, lambda t: [t.pop(k) for k in list(t) if any(s in k for s in temporal)])
    assert "Stable Diffusion image UNet" in msg and "original" in msg


def test_error_unknown_file(tmp_path):
    from safetensors.torch import save_file
    save_file({"encoder.conv_in.weight": torch.zeros(2)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="no SVD UNet found"):
        load_unet(tmp_path / "vae.safetensors", TINY)
    with pytest.raises(CheckpointError, match="no such file"):
        load_unet(tmp_path / "absent.safetensors", TINY)


def test_blocks_keep_a_contiguous_layout():
    """Every block output stays in standard (NCHW-contiguous) layout: a channels-last leak from the
    transformer's proj_out view once made every following conv re-layout its weights at each call."""
    torch.manual_seed(0)
    unet = VideoUNet(TINY).eval()
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, out: outs.append(out)) for _, b in unet.named_blocks()]
    with torch.no_grad():
        unet(torch.randn(4, 8, 8, 8), torch.zeros(4), torch.zeros(4, 1, 24), torch.zeros(4, 12), 2)
    for h in hooks:
        h.remove()
    assert len(outs) == len(list(unet.named_blocks())) and all(o.is_contiguous() for o in outs)


@pytest.mark.parametrize("fold_product", [True, False])
@pytest.mark.parametrize("image_only", [False, True])
def test_forward_changes_none_of_its_inputs(image_only, fold_product):
    """The blocks write sums, activations and blends into fresh tensors in place (speed, bit-identical): nothing
    the caller passes, and no block's saved output (the skip connections, the step cache's features), may change.
    Checked on a full call, a caching call and a call on cached features, with and without image-only frames."""
    torch.manual_seed(0)
    unet = VideoUNet(TINY, fold_product=fold_product).eval()
    x, ts, ctx, y = torch.randn(4, 8, 8, 8), torch.rand(4), torch.randn(4, 1, 24), torch.randn(4, 12)
    indicator = torch.tensor([[1.0, 0.0], [0.0, 0.0]]) if image_only else None
    vectors = unet.context_vectors(ctx, 2)
    inputs = [x, ts, ctx, y] + [t for pairs in vectors.values() for pair in pairs for t in pair]
    saved = [t.clone() for t in inputs]
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, out: outs.append((out, out.clone()))) for _, b in unet.named_blocks()]
    with torch.no_grad():
        plain = unet(x, ts, None, y, 2, indicator, vectors)
        _, features = unet(x, ts, None, y, 2, indicator, vectors, cache_depth=1)
        kept = features.clone()
        unet(x, ts, None, y, 2, indicator, vectors, cache_depth=1, cached=features)
    for h in hooks:
        h.remove()
    assert all(torch.equal(a, b) for a, b in zip(inputs, saved))
    assert torch.equal(features, kept) and outs and all(torch.equal(out, copy) for out, copy in outs)
    assert torch.equal(plain, unet(x, ts, None, y, 2, indicator, vectors))  # and the same result every time
