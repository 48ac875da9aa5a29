"""The shared layers' speed paths against the plain computation: `linear` as a 1x1 convolution, FeedForward in
row chunks, the VAE's VideoResBlock blend written into the spatial output."""
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from svdlite import kernels, layers, vae

# float32 products of length K summed in another order: |error| <= ~K * eps * max|terms|; these K (<= 512) and
# unit-scale data stay well inside 1e-5 of the output's largest value
TOL = 1e-5


class _Ops(TorchDispatchMode):
    """Records the names of the aten ops that run."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("shape", [(300, 96), (2, 200, 96), (7, 5, 64, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_as_convolution_equals_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    weight = torch.randn(48, shape[-1], generator=g) / shape[-1] ** 0.5
    b = torch.randn(48, generator=g) if bias else None
    with _Ops() as ops:
        out = layers.linear(x, weight, b)
    assert any("convolution" in n for n in ops.names)  # the convolution path ran (>= 256 rows)
    assert out.shape == (*shape[:-1], 48) and out.is_contiguous()
    assert _rel(out, F.linear(x, weight, b)) < TOL


def test_linear_keeps_f_linear_below_the_row_threshold_and_for_other_dtypes():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(32, 64, generator=g)
    small = torch.randn(kernels.CONV_LINEAR_MIN_ROWS - 1, 64, generator=g)
    half = torch.randn(400, 64, generator=g).bfloat16()
    for x, w in ((small, weight), (half, weight.bfloat16())):
        with _Ops() as ops:
            out = layers.linear(x, w)
        assert not any("convolution" in n for n in ops.names)
        assert torch.equal(out, F.linear(x, w))


def test_linear_module_has_nn_linear_keys():
    m = layers.Linear(8, 4)
    assert set(m.state_dict()) == {"weight", "bias"} and isinstance(m, torch.nn.Linear)


def test_feed_forward_in_row_chunks_equals_one_pass(monkeypatch):
    torch.manual_seed(0)
    ff = layers.FeedForward(32).eval()
    x = torch.randn(3, 250, 32)  # 750 rows
    with torch.no_grad():
        whole = ff.net(x)
        calls = []
        handle = ff.net[0].register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
        # a chunk of 64 rows: 64 x 256 float32 = 64 KiB
        monkeypatch.setattr(kernels, "FF_CHUNK_BYTES", 64 * 2 * 4 * 32 * 4)
        chunked = ff(x)
        handle.remove()
    assert calls == [64] * 11 + [46]
    assert chunked.shape == whole.shape
    assert _rel(chunked, whole) < TOL


@pytest.mark.parametrize("batch", [1, 2])
def test_vae_video_resblock_blend_is_the_original_formula(batch):
    torch.manual_seed(0)
    block = vae.VideoResBlock(64, 32, (3, 1, 1)).eval()
    with torch.no_grad():
        block.mix_factor.fill_(0.7)
        for p in block.time_stack.out_layers[3].parameters():
            p.normal_(0.0, 0.05)  # sgm zero-initialises this conv: make the temporal branch count
        frames = 5
        x = torch.randn(batch * frames, 64, 6, 6)
        x_before = x.clone()
        out = block(x, frames)
        # sgm temporal_ae.VideoResBlock: alpha * time_stack(x) + (1 - alpha) * x, alpha = sigmoid(mix_factor)
        spatial = rearrange(vae.ResnetBlock.forward(block, x), "(b t) c h w -> b c t h w", t=frames)
        alpha = torch.sigmoid(block.mix_factor)
        expected = rearrange(alpha * block.time_stack(spatial) + (1 - alpha) * spatial, "b c t h w -> (b t) c h w")
    assert torch.equal(x, x_before)
    assert out.is_contiguous()
    assert _rel(out, expected) < TOL
    # the temporal branch matters here: without it the output would be far off
    assert _rel(rearrange(spatial, "b c t h w -> (b t) c h w"), expected) > 1e-2


LAYERS = [(layers.Linear, nn.Linear, (6, 5)), (layers.Conv2d, nn.Conv2d, (4, 3, 3)),
          (layers.Conv3d, nn.Conv3d, (4, 3, 3)), (layers.GroupNorm, nn.GroupNorm, (2, 4)),
          (layers.LayerNorm, nn.LayerNorm, (7,))]


@pytest.mark.parametrize("ours, theirs, args", LAYERS, ids=lambda v: getattr(v, "__name__", ""))
def test_layers_initialise_as_torch_but_not_on_meta(ours, theirs, args, monkeypatch):
    """On a real device each layer initialises exactly as its torch class (same generator, same values); on the meta
    device (models built only to be loaded) its initialiser does not run at all."""
    torch.manual_seed(3)
    a = ours(*args)
    torch.manual_seed(3)
    b = theirs(*args)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())

    def refuse(self):
        raise AssertionError("initialiser ran")

    monkeypatch.setattr(theirs, "reset_parameters", refuse)
    with torch.device("meta"):
        m = ours(*args)
    assert all(p.is_meta for p in m.parameters()) and [p.shape for p in m.parameters()] == \
        [p.shape for p in b.parameters()]
    with pytest.raises(AssertionError, match="initialiser ran"):
        ours(*args)  # on the CPU it does run


def test_linear_compiles_without_graph_breaks():
    """`linear` traces into one graph under torch.compile, and there (CPU, float32, above the convolution's row
    threshold) it is F.linear, bit for bit."""
    import torch._dynamo

    from svdlite.kernels import CONV_LINEAR_MIN_ROWS
    from svdlite.layers import linear

    x, w, b = torch.randn(CONV_LINEAR_MIN_ROWS, 32), torch.randn(48, 32), torch.randn(48)
    explanation = torch._dynamo.explain(linear)(x, w, b)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch.testing.assert_close(torch.compile(linear, backend="eager")(x, w, b), torch.nn.functional.linear(x, w, b),
                               rtol=0, atol=0)  # the same op: bit for bit
