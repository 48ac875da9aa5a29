"""Reading tensors: once, straight into the final dtype, the memory map used in place only when nothing changes.

The cross-attention fold W_out W_v is computed in float32 by the converter (no float64 work; original and diffusers
files load attn2 to_v/to_out as they are, with no product): measured against the float64
product at SVD's full width (C = 1280, context 1024, weights of the checkpoint's scale), the largest error is
~4e-7 of the product's largest entry (float32 rounding over 1280-term sums); the bound below is 1e-6.
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from svdlite import strict_load, tensor_source
from svdlite.formats import open_model_source
from svdlite.loading import load_component, load_unet
from svdlite.read_plans import fold_matmul
from svdlite.tensor_source import ALIGNMENT, TensorSource, save_aligned
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
    monkeypatch.setattr(tensor_source, "READ_BUFFER_BYTES", 96)  # 48 fp16 values per piece, tensors of 1..5000 values
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
            _, _, start, _ = src._layout[key]
            storage = got.untyped_storage()  # a view of the whole file's map at the tensor's offset: not a copy
            assert storage.nbytes() == src.files[0].stat().st_size and got.data_ptr() - storage.data_ptr() == start
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
    """An original file loads with no tensor computed (the cross-attention as attn2.to_v/to_out, no product): each
    tensor read once, and the float32 load is the float16 load's values exactly."""
    path = tmp_path / "svd.safetensors"
    write_original_unet(path, TINY, seed=3, dtype=torch.float16)
    half, src = load_unet(path, TINY, dtype=torch.float16, return_source=True)
    full = load_unet(path, TINY, dtype=torch.float32)
    assert len(src.reads) == len(set(src.reads))
    state = full.state_dict()
    assert not any("attn2_fold" in k for k in state) and any(".attn2.to_v." in k for k in state)
    for key, value in state.items():
        assert value.dtype == torch.float32 and torch.equal(half.state_dict()[key].float(), value), key


def random_video_res_block(seed: int):
    from svdlite.unet_blocks import VideoResBlock

    g = torch.Generator().manual_seed(seed)
    block = VideoResBlock(32, 64, 32).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        block.time_mixer.mix_factor.fill_(1.0)  # alpha = 0.73: neither branch alone
    return block, g


def test_video_res_block_blend_is_sgms_blend():
    """The scaled add x + (1 - alpha) r equals sgm's alpha x + (1 - alpha)(x + r), computed here term by term, for
    video frames and image-only frames (alpha = 1, x kept); within 1e-6 (float32 rounding of a different order of
    sums over values of ~1). A block whose file holds (1 - alpha) in time_stack's last conv (svdlite files of stops
    13-15, `blend_folded`) gives the same. It fails if the blend is left out (checked: expected differs from x + r)."""
    from einops import rearrange

    block, g = random_video_res_block(4)
    x, emb = torch.randn(2 * 3, 32, 4, 4, generator=g), torch.randn(2 * 3, 64, generator=g)
    indicators = (torch.zeros(2, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    with torch.no_grad():
        spatial = rearrange(super(type(block), block).forward(x, emb), "(b t) c h w -> b c t h w", t=3)
        temporal = block.time_stack(spatial, rearrange(emb, "(b t) c -> b t c", t=3))
        for ind in indicators:
            alpha = torch.where(ind.bool(), 1.0, torch.sigmoid(torch.tensor(1.0)))[:, None, :, None, None]
            expected = rearrange(alpha * spatial + (1 - alpha) * temporal, "b c t h w -> (b t) c h w")
            torch.testing.assert_close(block(x, emb, 3, ind), expected, rtol=1e-6, atol=1e-6)
            assert not torch.allclose(expected, rearrange(temporal, "b c t h w -> (b t) c h w"), atol=1e-2)
        folded = random_video_res_block(4)[0]
        conv = folded.time_stack.out_layers[3]
        conv.weight.mul_(block.branch_scale(indicators[0])[0, 0])
        conv.bias.mul_(block.branch_scale(indicators[0])[0, 0])
        folded.blend_folded = True
        assert torch.equal(folded.branch_scale(indicators[1]), 1 - indicators[1])
        for ind in indicators:
            torch.testing.assert_close(folded(x, emb, 3, ind), block(x, emb, 3, ind), rtol=1e-6, atol=1e-6)


def test_reads_are_reported_in_steps_that_add_up_to_the_bytes_read(tmp_path, monkeypatch):
    """`load_planned(on_read=...)`, a progress bar's update: called about every PROGRESS_BYTES, and the calls
    add up to the file bytes of every tensor read (the two attn2 tensors of a folded entry both count)."""
    path = tmp_path / "svd.safetensors"
    write_original_unet(path, TINY, seed=5, dtype=torch.float16)
    quiet = load_unet(path, TINY, dtype=torch.float32)
    monkeypatch.setattr(strict_load, "PROGRESS_BYTES", 4096)
    calls = []
    ms = open_model_source(path, require_all=False, unet_config=TINY)
    model = load_component(ms, "unet", dtype=torch.float32, on_read=calls.append)
    src = ms.files["unet"]
    assert sum(calls) == sum(src.nbytes(k) for k in src.reads) and len(calls) > 10
    assert all(n >= 4096 for n in calls[:-1]) and 0 < calls[-1]
    assert all(torch.equal(a, b) for a, b in zip(quiet.state_dict().values(), model.state_dict().values()))
    assert src.nbytes(ORIGINAL_PREFIX + "out.2.bias") == 2 * TINY.out_channels  # float16: 2 bytes per value


def test_collector_paused_for_the_unet_only(monkeypatch):
    """gc is paused while the UNet is built (its ~27k objects), never around the CLIP tower, whose build imports
    open_clip: that import's cycles left uncollected would be collected, finalizers and all, mid-sampling."""
    import gc

    from svdlite import loading
    from svdlite.components import load_model

    seen = {}
    real = loading.build_component

    def spy(component, ms, **kwargs):
        seen[component] = gc.isenabled()
        return real(component, ms, **kwargs)

    monkeypatch.setattr(loading, "build_component", spy)
    assert gc.isenabled()
    load_model("tiny", device="cpu")
    assert seen == {"unet": False, "vae_encoder": True, "vae_decoder": True, "image_encoder": True}
    assert gc.isenabled()
