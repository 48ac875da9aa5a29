"""The memory choices of `svdlite.kernels` give the numbers of the unsliced computation: the feed-forward in row
chunks, GroupNorm32 in sample chunks, the UNet handing its block inputs over, the VAE decoder's per-frame work in
frame sub-batches. The GPU's choices are forced on CPU tensors (`kernels.as_device("cuda")`), the budgets shrunk so
the small tensors here are sliced; every comparison is bit for bit (torch.equal) unless its comment says why not."""
import pytest
import torch

from svdlite import kernels, layers
from svdlite.unet import VideoUNet

from helpers import load_tool


@pytest.fixture
def budgets(monkeypatch):
    """Sets kernels' byte budgets: budgets(name=bytes, ...)."""
    def set_(**values):
        for name, value in values.items():
            monkeypatch.setattr(kernels, name, value)
    return set_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_feed_forward_memory_chunks_equal_one_pass(budgets, dtype):
    torch.manual_seed(0)
    ff = layers.FeedForward(32).eval().to(dtype)
    x = torch.randn(3, 250, 32).to(dtype)  # 750 rows; the projection has 256 features
    with torch.no_grad(), kernels.as_device("cuda"):
        whole = ff.net(x)
        budgets(FF_MEMORY_BYTES=64 * 256 * x.element_size())  # chunks of 64 rows
        assert kernels.ff_rows(x, 256) == 64
        chunked = ff(x)
        budgets(FF_MEMORY_BYTES=2**40)
        assert kernels.ff_rows(x, 256) is None
    # a row's product does not depend on how many rows share the GEMM (CPU, chunks of tens of rows or more; for a
    # handful of rows MKL may pick another kernel with another summation order)
    assert torch.equal(chunked, whole)


def test_feed_forward_keeps_cpu_cache_chunks():
    x = torch.zeros(10_000, 320)
    assert kernels.ff_rows(x, 2560) == kernels.FF_CHUNK_BYTES // (2560 * 4)  # the CPU: cache-sized chunks
    with kernels.as_device("cuda"):
        assert kernels.ff_rows(x, 2560) is None  # 100 MiB: under the memory budget, one pass
    assert kernels.FORCE_DEVICE is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_norm32_sample_chunks_equal_one_pass(budgets, dtype):
    torch.manual_seed(0)
    norm = layers.GroupNorm32(64)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = (torch.randn(10, 64, 9, 7) * 3 + 1).to(dtype)
    with torch.no_grad():
        whole = norm(x)
        budgets(NORM_MEMORY_BYTES=3 * x[0].numel() * 4)
        assert kernels.norm_rows(x) == 3 and kernels.norm_rows(x.float()) is None
        chunked = norm(x)
    assert chunked.dtype == dtype and torch.equal(chunked, whole)


def test_unet_with_memory_choices_equals_without(budgets, monkeypatch):
    """The tiny UNet on the GPU's code path: feed-forward and group-norm chunks, block inputs handed over."""
    cm = load_tool("count_memory")
    torch.manual_seed(0)
    net = cm.build("svdlite", "unet", "tiny", torch.bfloat16, "cpu-real")
    assert isinstance(net, VideoUNet)
    frames, side = 2, net.config.latent_downscale
    x, t = torch.randn(2 * frames, 8, side, side).bfloat16(), torch.rand(2 * frames)
    ctx = torch.randn(2 * frames, 1, net.config.context_dim).bfloat16()
    y = torch.randn(2 * frames, net.config.adm_in_channels).bfloat16()
    chosen = []
    for name in ("ff_rows", "norm_rows"):
        choose = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, choose=choose: chosen.append(choose(*a)) or chosen[-1])
    with torch.no_grad(), kernels.as_device("cuda"):
        plain = net(x, t, ctx, y, frames)
        assert not any(chosen)
        budgets(FF_MEMORY_BYTES=4 * 1024, NORM_MEMORY_BYTES=1024)
        sliced = net(x, t, ctx, y, frames)
    assert sum(1 for c in chosen if c) > 10  # feed-forwards and norms ran in chunks
    assert torch.equal(sliced, plain)


def _decoder_and_latents(frames: int = 5):
    cm = load_tool("count_memory")
    torch.manual_seed(0)
    decoder = cm.build("svdlite", "decoder", "tiny", torch.float32, "cpu-real")
    return decoder, torch.randn(frames, 4, 8, 12)


def _decode_module_by_module(decoder, z, frames):
    """The decoder as sgm writes its forward: every block called whole, in order."""
    h = decoder.mid.block_2(decoder.mid.attn_1(decoder.mid.block_1(decoder.conv_in(z), frames)), frames)
    for level in reversed(decoder.up):
        for block in level.block:
            h = block(h, frames)
        if hasattr(level, "upsample"):
            h = level.upsample(h)
    return decoder.conv_out(torch.nn.functional.silu(decoder.norm_out(h)), frames)


def test_decoder_on_the_cpu_is_the_module_composition(budgets):
    """On the CPU the decoder never runs in frame sub-batches, whatever the budget: its forward is the blocks
    called whole, in order (inputs handed over), the same ops on the same tensors."""
    decoder, z = _decoder_and_latents()
    budgets(DECODE_MEMORY_BYTES=1)
    assert kernels.decode_frames(z, decoder.frame_bytes(z)) == z.shape[0]
    with torch.no_grad():
        assert torch.equal(decoder(z, 5), _decode_module_by_module(decoder, z, 5))


@pytest.mark.parametrize("per_batch", [1, 2])
def test_decoder_frame_sub_batches_equal_one_batch(budgets, per_batch):
    decoder, z = _decoder_and_latents()
    frame_bytes = decoder.frame_bytes(z)
    assert frame_bytes == 32 * 64 * 96 * 4  # the tiny decoder's widest full-resolution tensor: 32 channels
    with torch.no_grad(), kernels.as_device("cuda"):
        whole = decoder(z, 5)
        budgets(DECODE_MEMORY_BYTES=per_batch * frame_bytes)
        assert kernels.decode_frames(z, frame_bytes) == per_batch
        sliced = decoder(z, 5)
    # not bit for bit on the CPU: oneDNN picks its convolution kernel by batch size, and a one-frame batch can sum
    # a pixel's C_in x 9 products in another order; float32 sums of <= 288 unit-scale terms reordered stay within
    # 1e-5 of the output's largest value (measured: ~1e-7)
    assert (sliced - whole).abs().max() <= 1e-5 * whole.abs().max()
