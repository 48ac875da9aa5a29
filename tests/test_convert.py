"""tools/convert_weights.py: original and diffusers sources to svdlite files, checked by reloading.

Tiny configs; the full-size conversion is in test_convert_full.py."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from svdlite import load_unet
from svdlite.clip import CLIPVisionConfig
from svdlite.components import load_model
from svdlite.convert import sha256_of
from svdlite.testing import original_checkpoint_shapes, random_tensors
from svdlite.unet import UNetConfig
from svdlite.vae import VAEConfig

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("convert_weights", REPO / "tools" / "convert_weights.py")
convert_weights = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert_weights)

UNET = UNetConfig(model_channels=64, channel_mult=(1, 1, 1, 1), context_dim=1024)  # 64-wide heads, as SVD
VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1))


def write_original(path: Path, components=("unet", "vae_encoder", "vae_decoder", "image_encoder"), edit=None):
    """A tiny SVD-shaped original file; the UNet and VAE are tiny, the CLIP tower ViT-H-shaped but 1 layer."""
    shapes = original_checkpoint_shapes(UNET, VAE, CLIP, components)
    tensors = random_tensors(shapes, seed=11)
    if edit:
        edit(tensors)
    save_file(tensors, str(path))
    return tensors


CLIP = CLIPVisionConfig(layers=1)


def run(*args) -> int:
    return convert_weights.main([str(a) for a in args])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "svd_xt.safetensors"
    write_original(path)
    return path


def unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = 2
    x, ctx = torch.randn(2 * t, 8, 8, 8, generator=g), torch.randn(2 * t, 1, 1024, generator=g)
    y, ts = torch.randn(2 * t, 768, generator=g), torch.full((2 * t,), 0.3)
    with torch.no_grad():
        return unet(x, ts, ctx, y, t)


def test_fp32_conversion_is_exact_and_reads_no_cross_attention(original, tmp_path, capsys):
    out = tmp_path / "svd_xt.svdlite.safetensors"
    assert run(original, out, "--dtype", "fp32") == 0
    log = capsys.readouterr().out
    assert "preset svd-xt" in log and "cross-attention to_q/to_k" in log and "first_stage_model encoder" in log
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert not any(".attn2." in k for k in keys) and any(".attn2_fold." in k for k in keys)
    assert meta["format"] == "svdlite" and meta["format_version"] == "1" and meta["preset"] == "svd-xt"
    assert meta["source_sha256"] == sha256_of([original]) and meta["svdlite_version"]
    assert UNetConfig.from_dict(json.loads(meta["unet_config"])) == UNET
    converted, src = load_unet(out, return_source=True)
    assert not any("attn2" in k and "attn2_fold" not in k for k in src.reads)
    reference, src = load_unet(original, UNET, return_source=True)
    assert not any(".attn2.to_q." in k or ".attn2.to_k." in k for k in src.reads)
    assert_same_network(converted, reference, unet_output)
    model = load_model(out)
    assert model.preset == "svd-xt" and model.clip_config == CLIP and model.vae_config == VAE
    assert leftovers(tmp_path) == []


def test_fp16_conversion_close(original, tmp_path):
    out = tmp_path / "half.safetensors"
    assert run(original, out) == 0
    converted, reference = load_unet(out), load_unet(original, UNET)
    a, b = unet_output(converted), unet_output(reference)
    # fp16 storage rounds every weight by up to 2^-11 relative; measured 2e-3 relative on this network
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-2


def test_refuses_to_overwrite_and_leaves_nothing_on_failure(original, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    assert run(original, out) == 2
    assert out.read_bytes() == b"precious" and "--force" in capsys.readouterr().err
    broken = tmp_path / "broken_svd.safetensors"
    write_original(broken, edit=lambda t: t.__setitem__("model.diffusion_model.out.2.weight", torch.zeros(5, 32, 3, 3)))
    assert run(broken, out, "--force") == 1
    assert out.read_bytes() == b"precious" and "out.2.weight" in capsys.readouterr().err
    target = tmp_path / "new.safetensors"
    assert run(broken, target) == 1 and not target.exists()
    assert leftovers(tmp_path) == []
    assert run(original, out, "--force") == 0 and out.read_bytes()[:8] != b"precious"


def test_source_without_image_encoder_converts_with_a_warning(tmp_path, capsys):
    src = tmp_path / "svd.safetensors"
    write_original(src, components=("unet", "vae_encoder", "vae_decoder"))
    out = tmp_path / "no_clip.safetensors"
    assert run(src, out) == 0
    assert "warning" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["components"] == "unet,vae_encoder,vae_decoder"
        assert f.metadata()["preset"] == "svd"
    with pytest.raises(ValueError, match="without image_encoder"):
        load_model(out)
    load_unet(out)  # the UNet alone loads


def test_diffusers_unet_folder_converts(tmp_path, capsys):
    folder = REPO / "tests" / "data" / "diffusers_unet_tiny"
    out = tmp_path / "from_diffusers.safetensors"
    assert run(folder, out, "--dtype", "fp32") == 0
    assert "diffusers format" in capsys.readouterr().out
    # fp16 source, folds in float32, stored fp32: the same tensors the diffusers path loads
    assert_same_network(load_unet(out), load_unet(folder), unet_output_small)


def assert_same_network(a, b, output):
    """The same tensors to the bit (same folds, same rounding), and outputs equal to float32 rounding: the
    files lay the tensors out at different alignments, both are used in place, and some CPU kernels round
    differently on differently aligned weights (seen: a 1x1 convolution at one thread, 1.3e-6 of the output's
    scale; bit-identical at two threads), so the bound is 1e-5 of the largest value, ~100 float32 ulps."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ya, yb = output(a), output(b)
    assert ((ya - yb).abs().max() / yb.abs().max()).item() < 1e-5


def unet_output_small(unet):
    g = torch.Generator().manual_seed(0)
    c = unet.config
    x = torch.randn(6, c.in_channels, 8, 8, generator=g)
    ctx, y = torch.randn(6, 1, c.context_dim, generator=g), torch.randn(6, c.adm_in_channels, generator=g)
    with torch.no_grad():
        return unet(x, torch.full((6,), 0.1), ctx, y, 3)


def test_blend_fold_is_stored_and_loads_as_the_original_does(tmp_path):
    """An fp16 original -> an fp16 svdlite file whose temporal convs hold the blend fold: loaded to float16 it equals
    the original file loaded to float16 tensor for tensor (bit-identical: the same float32 products, rounded once);
    loaded to float32, too, but for the two folds, which the file holds rounded to float16 (the float32 load is
    that rounding exactly); converting it again does not fold twice."""
    src = tmp_path / "svd_xt.safetensors"
    write_original(src, edit=lambda t: t.update({k: v.half() for k, v in t.items()}))
    out, again = tmp_path / "half.safetensors", tmp_path / "again.safetensors"
    assert run(src, out) == 0 and run(out, again, "--dtype", "fp16") == 0
    for path in (out, again):
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["unet_temporal_blend"] == "folded"
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
    for dtype in (torch.float16, torch.float32):
        reference = load_unet(src, UNET, dtype=dtype).state_dict()
        for path in (out, again):
            converted = load_unet(path, dtype=dtype).state_dict()
            assert converted.keys() == reference.keys()
            for k, v in reference.items():
                folded = ".attn2_fold." in k or ".time_stack.out_layers.3." in k
                expected = v.half().to(dtype) if folded else v
                assert converted[k].dtype == dtype and torch.equal(converted[k], expected), (path.name, dtype, k)
