"""Layers shared by the UNet and the VAE: sinusoidal embeddings, fp32 GroupNorm, the sgm ResBlock, GEGLU FF.

Attribute names follow the original sgm modules (`in_layers`, `emb_layers`, `out_layers`, `skip_connection`,
`net.0.proj`, `net.2`) so checkpoints load key for key.
"""
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """sgm `timestep_embedding`: [cos(t*f), sin(t*f)] (cos first), f_i = max_period^(-i/half), in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """sgm `GroupNorm32`: 32 groups, eps 1e-5, computed in float32 whatever the input dtype."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(32, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).type(x.dtype)


class UpcastGroupNorm(nn.GroupNorm):
    """sgm's plain `GroupNorm` as it runs under its fp16 autocast: half-precision input is normalised in float32
    (autocast's fp32 list has group_norm); float32 and float64 input run unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                                self.eps).type(x.dtype)
        return super().forward(x)


def conv_nd(dims: int, c_in: int, c_out: int, kernel_size, **kwargs) -> nn.Module:
    """A 2-D or 3-D convolution with 'same' padding for odd kernels (sgm `conv_nd` + its padding rule)."""
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size,) * dims
    padding = tuple(k // 2 for k in kernel_size)
    cls = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
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
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
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
        return self.out_layers(h)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.branch(x, emb).add_(self.skip_connection(x))


class GEGLU(nn.Module):
    """Linear projection to 2*dim_out, split into (a, gate), return a * GELU(gate) (exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(a)  # into GELU's fresh output: no third tensor of this size


class FeedForward(nn.Module):
    """sgm `FeedForward(glu=True, mult=4)`: keys `net.0.proj` and `net.2` (`net.1` was dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
