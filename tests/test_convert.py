"""tools/convert_weights.py: original and diffusers sources to svdlite files, checked by reloading.

Tiny configs; the full-size conversion is in test_convert_full.py."""
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
from svdlite.read_plans import fold_matmul
from svdlite.testing import original_checkpoint_shapes, random_tensors
from svdlite.unet import UNetConfig
from svdlite.vae import VAEConfig

from helpers import load_tool

REPO = Path(__file__).resolve().parents[1]
convert_weights = load_tool("convert_weights")

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
    assert not any("attn2" in k and "attn2_fold" not in k for k in src.reads)  # the file has only the product
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
    assert run(broken, out, "--force") == 2  # refused: a bad checkpoint, as `svdlite generate` refuses it
    assert out.read_bytes() == b"precious" and "out.2.weight" in capsys.readouterr().err
    target = tmp_path / "new.safetensors"
    assert run(broken, target) == 2 and not target.exists()
    assert leftovers(tmp_path) == []
    assert run(original, out, "--force") == 0 and out.read_bytes()[:8] != b"precious"


def test_failure_while_converting_exits_1_and_debug_shows_it(original, tmp_path, monkeypatch, capsys):
    """Exit codes as the `svdlite` command's: a failure after the checks (here a write error) is 1 with one line,
    and --debug raises it with its traceback."""
    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(convert_weights, "convert", fail)
    out = tmp_path / "out.safetensors"
    assert run(original, out) == 1
    err = capsys.readouterr().err
    assert err.startswith("svdlite: error: OSError: No space left on device") and not out.exists()
    with pytest.raises(OSError, match="No space left"):
        run(original, out, "--debug")


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


def as_product(state: dict) -> dict:
    """A UNet state loaded from an original or diffusers file (attn2 as `to_v` and `to_out.0`) with each
    cross-attention replaced by what the converter stores: `attn2_fold` = W_out W_v in float32, rounded once to the
    state's dtype, and b_out."""
    out = {}
    for key, value in state.items():
        base, _, leaf = key.rpartition("attn2.")
        if leaf == "to_out.0.weight":
            out[base + "attn2_fold.weight"] = fold_matmul(value.float(), state[base + "attn2.to_v.weight"].float()
                                                          ).to(value.dtype)
        elif leaf == "to_out.0.bias":
            out[base + "attn2_fold.bias"] = value
        elif leaf != "to_v.weight":
            out[key] = value
    return out


def assert_same_network(converted, source, output):
    """The converted network's tensors are the source's to the bit (the fold: the same float32 product, rounded the
    same way), and the outputs agree to 1e-5 of the largest value, ~100 float32 ulps: the converted network applies
    the product W_out W_v to the CLIP token, the source network W_v then W_out (the original's order), which rounds
    differently, and the files lay tensors out at different alignments, both used in place, where some CPU kernels
    round differently (seen: a 1x1 convolution at one thread, 1.3e-6 of the output's scale)."""
    sa, sb = converted.state_dict(), as_product(source.state_dict())
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ya, yb = output(converted), output(source)
    assert ((ya - yb).abs().max() / yb.abs().max()).item() < 1e-5


def unet_output_small(unet):
    g = torch.Generator().manual_seed(0)
    c = unet.config
    x = torch.randn(6, c.in_channels, 8, 8, generator=g)
    ctx, y = torch.randn(6, 1, c.context_dim, generator=g), torch.randn(6, c.adm_in_channels, generator=g)
    with torch.no_grad():
        return unet(x, torch.full((6,), 0.1), ctx, y, 3)


def test_fp16_conversion_loads_as_the_original_does(tmp_path):
    """An fp16 original -> an fp16 svdlite file: loaded to float16 it equals the original file loaded to float16
    tensor for tensor, the fold the same float32 product rounded once; loaded to float32, too, but for the fold,
    which the file holds rounded to float16 (the float32 load is that rounding exactly); converting it again changes
    nothing. The file holds the weights as they are: no blend metadata, temporal convs unscaled."""
    src = tmp_path / "svd_xt.safetensors"
    write_original(src, edit=lambda t: t.update({k: v.half() for k, v in t.items()}))
    out, again = tmp_path / "half.safetensors", tmp_path / "again.safetensors"
    assert run(src, out) == 0 and run(out, again, "--dtype", "fp16") == 0
    for path in (out, again):
        with safe_open(str(path), "pt") as f:
            assert "unet_temporal_blend" not in f.metadata()
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
    for dtype in (torch.float16, torch.float32):
        reference = as_product(load_unet(src, UNET, dtype=dtype).state_dict())
        for path in (out, again):
            converted = load_unet(path, dtype=dtype).state_dict()
            assert converted.keys() == reference.keys()
            for k, v in reference.items():
                expected = v.half().to(dtype) if ".attn2_fold." in k else v
                assert converted[k].dtype == dtype and torch.equal(converted[k], expected), (path.name, dtype, k)


def test_file_with_the_blend_folded_in_still_loads(tmp_path):
    """svdlite files written by earlier converters hold each VideoResBlock's time_stack.out_layers.3 scaled by
    (1 - alpha), with metadata unet_temporal_blend=folded. Made here from a new file as that converter
    did (float32 product, rounded once to fp16): it loads to the same output as the new file (1e-3 relative: the
    fold's fp16 rounding, 2^-11 per weight), a different one if the metadata is ignored, and converting it again keeps
    both the scaled tensors and the metadata (no second fold, no lost fold)."""
    from safetensors.torch import load_file

    from svdlite.tensor_source import save_aligned
    from svdlite.unet_blocks import VideoResBlock

    src, new, old, again = (tmp_path / n for n in ("svd_xt.safetensors", "new.st", "old.st", "again.st"))
    write_original(src, edit=lambda t: t.update({k: v.half() for k, v in t.items()}))
    assert run(src, new) == 0
    tensors = load_file(str(new))
    with safe_open(str(new), "pt") as f:
        metadata = f.metadata()
    unet = load_unet(new)
    for name, block in unet.named_modules():
        if isinstance(block, VideoResBlock):
            for leaf in ("weight", "bias"):
                key = f"unet.{name}.time_stack.out_layers.3.{leaf}"
                scale = block.branch_scale(torch.zeros(1, 1))[0, 0]  # 1 - alpha, float32
                tensors[key] = (tensors[key].float() * scale).half()  # rounded once
    save_aligned(tensors, old, {**metadata, "unet_temporal_blend": "folded"})
    a, b = unet_output_small(load_unet(new)), unet_output_small(load_unet(old))
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-3
    save_aligned(tensors, tmp_path / "unmarked.st", metadata)
    c = unet_output_small(load_unet(tmp_path / "unmarked.st"))
    assert ((a - c).abs().max() / a.abs().max()).item() > 1e-2
    assert run(old, again, "--dtype", "fp16") == 0
    with safe_open(str(again), "pt") as f:
        assert f.metadata()["unet_temporal_blend"] == "folded"
    re_read = load_file(str(again))
    assert all(torch.equal(re_read[k], v) for k, v in tensors.items() if k.startswith("unet."))
