"""Layers shared by the UNet and the VAE: sinusoidal embeddings, fp32 GroupNorm, the sgm ResBlock, GEGLU FF.

Attribute names follow the original sgm modules (`in_layers`, `emb_layers`, `out_layers`, `skip_connection`,
`net.0.proj`, `net.2`) so checkpoints load key for key.
"""
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import kernels


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """sgm `timestep_embedding`: [cos(t*f), sin(t*f)] (cos first), f_i = max_period^(-i/half), in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); float32 on the CPU with >= kernels.CONV_LINEAR_MIN_ROWS rows as a 1x1 convolution
    (`kernels.conv_linear` decides).

    The rows of x, as they lie in memory, are the pixels of a channels-last (1, K, rows, 1) image, and weight
    (N, K) viewed as (N, K, 1, 1) is a 1x1 convolution of it: the same products, through oneDNN's convolution
    kernels, which on this class of CPU (AVX2, 2 threads) run them 10-40% faster than the GEMM behind F.linear.
    Equal to F.linear up to float32 rounding (summation order); no copy in or out (the result is channels-last,
    i.e. row-major (rows, N)). Other dtypes and devices, and code under torch.compile, take F.linear."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if not kernels.conv_linear(x, rows):
        return F.linear(x, weight, bias)
    image = x.reshape(1, rows, 1, k).permute(0, 3, 1, 2)
    out = F.conv2d(image, weight[:, :, None, None], bias)
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


class SkipMetaInit:
    """Mixin for torch layers: `reset_parameters` does nothing while the layer's parameters are on the meta device.

    Models are built on the meta device only to be loaded (`strict_load.load_planned` replaces every tensor),
    and initialising meta tensors, each op through torch's device mode, cost 0.06-0.15 s of building the UNet
    (0.04 s without it; docs/SPEED.md). On a real device the layer initialises exactly as its torch class."""

    def reset_parameters(self) -> None:
        if not any(p.is_meta for p in self.parameters(recurse=False)):
            super().reset_parameters()


class Linear(SkipMetaInit, nn.Linear):
    """nn.Linear (same parameters, keys and initialisation) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Conv2d(SkipMetaInit, nn.Conv2d):
    """nn.Conv2d, not initialised on the meta device (`SkipMetaInit`)."""


class Conv3d(SkipMetaInit, nn.Conv3d):
    """nn.Conv3d, not initialised on the meta device (`SkipMetaInit`)."""


class GroupNorm(SkipMetaInit, nn.GroupNorm):
    """nn.GroupNorm, not initialised on the meta device (`SkipMetaInit`)."""


class LayerNorm(SkipMetaInit, nn.LayerNorm):
    """nn.LayerNorm, not initialised on the meta device (`SkipMetaInit`)."""


class GroupNorm32(GroupNorm):
    """sgm `GroupNorm32`: 32 groups, eps 1e-5, computed in float32 whatever the input dtype."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(32, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _float32_group_norm(self, x)


def _float32_group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x) computed in float32, returned in x's dtype. Half-precision input is normalised in sample chunks when
    its float32 copy is large (`kernels.norm_rows`): every sample has its own statistics, so each chunk is the same
    computation, and the float32 copy and result never exist for the whole batch (2 x 1,688 MiB beside the
    843 MiB input at the UNet's level-0 concatenations, SVD-XT 1024x576 x 25 frames, docs/memory.md)."""
    rows = kernels.norm_rows(x)
    if rows is None:
        return F.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps).type(x.dtype)
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], rows):
        part = x[start:start + rows].float()
        out[start:start + rows] = F.group_norm(part, norm.num_groups, norm.weight.float(), norm.bias.float(),
                                               norm.eps)
    return out


class UpcastGroupNorm(GroupNorm):
    """sgm's plain `GroupNorm` as it runs under its fp16 autocast: half-precision input is normalised in float32
    (autocast's fp32 list has group_norm); float32 and float64 input run unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            return _float32_group_norm(self, x)
        return super().forward(x)


def conv_nd(dims: int, c_in: int, c_out: int, kernel_size, **kwargs) -> nn.Module:
    """A 2-D or 3-D convolution with 'same' padding for odd kernels (sgm `conv_nd` + its padding rule)."""
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size,) * dims
    padding = tuple(k // 2 for k in kernel_size)
    cls = {2: Conv2d, 3: Conv3d}[dims]
    return cls(c_in, c_out, kernel_size, padding=padding, **kwargs)


class ResBlock(nn.Module):
    """sgm `openaimodel.ResBlock` (additive timestep injection, no scale-shift norm, no up/down sampling).

    dims=2 is the UNet's spatial block; dims=3 with kernel (3,1,1) is the temporal `time_stack` of the UNet
    (`exchange_temb_dims=True`, emb given per frame as (b, t, C)) and of the VAE decoder (`skip_t_emb=True`).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, *, dims: int = 2,
                 kernel_size=3, exchange_temb_dims: bool = False, skip_t_emb: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.exchange_temb_dims = exchange_temb_dims
        self.skip_t_emb = skip_t_emb
        # SiLU in place on the norm's fresh output (the emb SiLU is not: its input is shared)
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(inplace=True),
                                       conv_nd(dims, channels, out_channels, kernel_size))
        if not skip_t_emb:
            self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, out_channels))
        # index 2 is the (inactive) dropout of the original, kept so `out_layers.3` matches the checkpoint
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(inplace=True), nn.Identity(),
                                        conv_nd(dims, out_channels, out_channels, kernel_size))
        self.skip_connection = nn.Identity() if out_channels == channels else conv_nd(dims, channels, out_channels, 1)

    def branch(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """The residual branch out_layers(in_layers(x) + emb) alone, a fresh tensor: forward adds the skip to it;
        the video blocks add it into their own spatial output instead, which keeps that output's layout."""
        h = self.in_layers(x)
        if not self.skip_t_emb:
            e = self.emb_layers(emb).type(h.dtype)
            if self.exchange_temb_dims:
                e = rearrange(e, "b t c -> b c t")
            h += e.reshape(*e.shape, *([1] * (h.ndim - e.ndim)))  # h is the conv's fresh output: in place
        # layer by layer, h rebound: in_layers' output dies once out_layers' norm has read it (passed to
        # `out_layers(h)` it would stay bound here through the whole Sequential: the VAE decoder's peak)
        for layer in self.out_layers:
            h = layer(h)
        return h

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.branch(x, emb).add_(self.skip_connection(x))


class GEGLU(nn.Module):
    """Linear projection to 2*dim_out, split into (a, gate), return a * GELU(gate) (exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(a)  # into GELU's fresh output: no third tensor of this size


class FeedForward(nn.Module):
    """sgm `FeedForward(glu=True, mult=4)`: keys `net.0.proj` and `net.2` (`net.1` was dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = kernels.ff_rows(x, self.net[0].proj.out_features)
        if rows is None:
            return self.net(x)
        # token rows in chunks (rows are independent): on the CPU each chunk's (rows, 8 dim) projection stays small
        # enough for the allocator to reuse and the cache to hold; elsewhere the (rows, 8 dim) projection and its
        # (rows, 4 dim) GELU product never exist for all rows at once. Each chunk's result goes into one output.
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_empty(flat.shape[0], self.net[2].out_features)
        for start in range(0, flat.shape[0], rows):
            out[start:start + rows] = self.net(flat[start:start + rows])
        return out.view(*x.shape[:-1], out.shape[-1])
