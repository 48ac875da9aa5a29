"""Reading tensors: once, straight into the final dtype, the memory map used in place only when nothing changes.

The cross-attention fold W_out W_v is computed in float32 at load (no float64 work): measured against the float64
product at SVD's full width (C = 1280, context 1024, weights of the checkpoint's scale), the largest error is
~4e-7 of the product's largest entry (float32 rounding over 1280-term sums); the bound below is 1e-6.
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from svdlite import loading
from svdlite.convert import save_aligned
from svdlite.loading import ALIGNMENT, TensorSource, fold_matmul, load_unet
from svdlite.testing import random_tensors
from svdlite.unet_keymap import ORIGINAL_PREFIX

from helpers import TINY, original_unet_shapes, write_original_unet


def test_float32_fold_error_against_float64():
    g = torch.Generator().manual_seed(0)
    w_out = (torch.randn(1280, 1280, generator=g) * 1280 ** -0.5).half()  # fp16 checkpoints, as released
    w_v = (torch.randn(1280, 1024, generator=g) * 1024 ** -0.5).half()
    exact = fold_matmul(w_out.double(), w_v.double())
    got = fold_matmul(w_out.float(), w_v.float())
    err = ((got.double() - exact).abs().max() / exact.abs().max()).item()
    assert err < 1e-6, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_converted_reads_equal_a_cast_in_small_pieces(tmp_path, monkeypatch, dtype):
    """fp16 file -> any dtype through a read buffer far smaller than the tensors: equal to safetensors + cast."""
    monkeypatch.setattr(loading, "READ_BUFFER_BYTES", 96)  # 48 fp16 values per piece, tensors of 1..5000 values
    tensors = random_tensors({"a": (5000,), "b": (7, 3, 3), "c": (1,), "d": (64, 65)}, seed=1, dtype=torch.float16)
    save_file(tensors, str(tmp_path / "x.safetensors"))
    src = TensorSource([tmp_path / "x.safetensors"])
    for key, ref in load_file(str(tmp_path / "x.safetensors")).items():
        got = src.get(key, dtype)
        assert got.dtype == dtype and torch.equal(got, ref.to(dtype)), key
        if dtype != torch.float16:  # converted into a fresh tensor (fp16 to fp16 is the map in place, below)
            assert got.data_ptr() % ALIGNMENT == 0 and got.untyped_storage().nbytes() == ref.numel() * dtype.itemsize
    assert src.reads == list(load_file(str(tmp_path / "x.safetensors")))


def test_same_dtype_uses_the_memory_map_in_place_at_any_alignment(tmp_path):
    tensors = random_tensors({"w": (64, 32), "odd": (3,), "v": (128,)}, seed=2, dtype=torch.float16)
    save_aligned(tensors, tmp_path / "a.safetensors", {"format": "test"})
    save_file({"a_pad": torch.zeros(1, dtype=torch.float16), **tensors}, str(tmp_path / "b.safetensors"))
    assert load_file(str(tmp_path / "a.safetensors")).keys() == tensors.keys()  # a valid safetensors file
    aligned, unaligned = TensorSource([tmp_path / "a.safetensors"]), TensorSource([tmp_path / "b.safetensors"])
    assert aligned.metadata == {"format": "test"}
    for src in aligned, unaligned:
        for key, ref in tensors.items():
            got = src.get(key, torch.float16)
            assert torch.equal(got, ref)
            assert got.untyped_storage().nbytes() == ref.nbytes  # the file's bytes (a fresh copy would be aligned)
            _, _, start, _ = src._layout[key]
            assert got.data_ptr() % ALIGNMENT == start % ALIGNMENT
    assert aligned._layout["w"][2] % ALIGNMENT == 0  # svdlite's writer: 64-byte aligned
    assert unaligned._layout["w"][2] % ALIGNMENT != 0  # safetensors': after the 2-byte pad, 2-byte aligned
    got = unaligned.get("w", torch.float16)
    got.mul_(2)  # a private map: writing copies the page, the file and a fresh read keep the stored values
    assert torch.equal(TensorSource([tmp_path / "b.safetensors"]).get("w", torch.float16), tensors["w"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unaligned_weights_are_used_in_place_and_give_the_same_network(tmp_path, dtype):
    """One network from two files: svdlite's 64-byte aligned layout, and safetensors' own shifted by a 2- or 4-byte
    pad so that most tensors are not 64-byte aligned, both used in place. The tensors are equal to the bit; the
    outputs equal to float32 rounding (1e-5 of the largest value, 1e-3 in float16): some CPU kernels round
    differently on differently aligned weights (seen: a 1x1 convolution at one thread, 1.3e-6), none at two."""
    tensors = {ORIGINAL_PREFIX + k: v for k, v in
               random_tensors(original_unet_shapes(TINY), seed=6, dtype=dtype).items()}
    save_aligned(tensors, tmp_path / "aligned.safetensors", {})
    save_file({"a_pad": torch.zeros(1, dtype=dtype), **tensors}, str(tmp_path / "shifted.safetensors"))
    aligned = load_unet(tmp_path / "aligned.safetensors", TINY, dtype=dtype)
    shifted = load_unet(tmp_path / "shifted.safetensors", TINY, dtype=dtype)
    state, reference = shifted.state_dict(), aligned.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert sum(t.data_ptr() % ALIGNMENT != 0 for t in state.values()) > len(state) // 2
    g = torch.Generator().manual_seed(7)
    frames = 3
    args = (torch.randn(2 * frames, TINY.in_channels, 8, 8, generator=g).to(dtype), torch.full((2 * frames,), 0.4),
            torch.randn(2 * frames, 1, TINY.context_dim, generator=g).to(dtype),
            torch.randn(2 * frames, TINY.adm_in_channels, generator=g).to(dtype), frames)
    with torch.no_grad():
        a, b = aligned(*args).float(), shifted(*args).float()
    assert ((a - b).abs().max() / a.abs().max()).item() < (1e-5 if dtype == torch.float32 else 1e-3)


def test_unet_state_is_read_once_per_tensor_and_equal_across_dtypes(tmp_path):
    path = tmp_path / "svd.safetensors"
    write_original_unet(path, TINY, seed=3, dtype=torch.float16)
    half, src = load_unet(path, TINY, dtype=torch.float16, return_source=True)
    full = load_unet(path, TINY, dtype=torch.float32)
    assert len(src.reads) == len(set(src.reads))
    for key, value in full.state_dict().items():
        assert value.dtype == torch.float32
        if "attn2_fold.weight" in key or ".time_stack.out_layers.3." in key:
            # the folds (cross-attention, VideoResBlock blend) are computed in float32 and rounded once to fp16
            assert torch.equal(half.state_dict()[key], value.half()), key
        else:  # plain tensors: the fp16 file's values, exactly
            assert torch.equal(half.state_dict()[key].float(), value), key


def test_temporal_blend_fold_is_the_blend(tmp_path):
    """VideoResBlock with (1 - alpha) folded into time_stack's last conv equals the explicit blend, for video frames
    and for image-only frames (alpha = 1)."""
    from svdlite.loading import fold_temporal_blend
    from svdlite.unet_blocks import VideoResBlock

    g = torch.Generator().manual_seed(4)
    block = VideoResBlock(32, 64, 32).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x, emb = torch.randn(2 * 3, 32, 4, 4, generator=g), torch.randn(2 * 3, 64, generator=g)
    indicators = (torch.zeros(2, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    with torch.no_grad():
        expected = [block(x, emb, 3, ind) for ind in indicators]
        fold_temporal_blend(block)
        assert block.blend_folded and set(dict(block.named_parameters())) == set(dict(VideoResBlock(32, 64, 32).named_parameters()))
        for ind, ref in zip(indicators, expected):
            torch.testing.assert_close(block(x, emb, 3, ind), ref, rtol=1e-6, atol=1e-6)
