"""Attention: one SDPA call site, an exact explicit-softmax path beside it for tests, and the self-attention module.

Cross-attention is folded in svdlite's network (see `unet_blocks.py`): to one Linear `attn2_fold` (svdlite files) or
to `SingleTokenAttention`, its value path (original and diffusers files). `CrossAttention` is the original
computation, built only for the ablation that measures what the fold saves (`fold_cross_attention=False`).
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layers import Linear


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (batch, heads, tokens, d) through torch's fused kernel."""
    return F.scaled_dot_product_attention(q, k, v)


def attention_probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The explicit attention map softmax(q k^T / sqrt(d)) in float32: (batch, heads, queries, keys)."""
    scores = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same product computed explicitly in float32 (sgm `CrossAttention` with softmax); for tests."""
    return torch.einsum("bhij,bhjd->bhid", attention_probabilities(q, k), v.float()).type(q.dtype)


class SelfAttention(nn.Module):
    """sgm `CrossAttention` used as self-attention: bias-free to_q/to_k/to_v, `to_out.0` Linear with bias."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = Linear(dim, inner, bias=False)
        self.to_k = Linear(dim, inner, bias=False)
        self.to_v = Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, dim))  # `to_out.1` was dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(f(x), "b n (h d) -> b h n d", h=self.heads) for f in (self.to_q, self.to_k, self.to_v))
        out = rearrange(attention(q, k, v), "b h n d -> b n (h d)")
        del q, k, v  # dead once attended: not live beside to_out's result
        return self.to_out(out)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The explicit attention map softmax(q k^T / sqrt(d)) in float32, (b, heads, n, n); the fused kernel of
        `forward` never forms it. For statistics (F3 calibration), not for the forward pass."""
        q, k = (rearrange(f(x), "b n (h d) -> b h n d", h=self.heads) for f in (self.to_q, self.to_k))
        return attention_probabilities(q, k)


class CrossAttention(SelfAttention):
    """sgm `CrossAttention` with a context: queries from x (dim), keys and values from context (context_dim)."""

    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__(dim, heads, dim_head)
        self.to_k = Linear(context_dim, heads * dim_head, bias=False)
        self.to_v = Linear(context_dim, heads * dim_head, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = (rearrange(f(context), "b n (h d) -> b h n d", h=self.heads) for f in (self.to_k, self.to_v))
        out = rearrange(attention(q, k, v), "b h n d -> b n (h d)")
        del q, k, v
        return self.to_out(out)


class SingleTokenAttention(nn.Module):
    """Cross-attention to a single context token, as the value path it reduces to: softmax over one key is 1, so
    every query's output is to_out(to_v(c)), a constant; `to_q`/`to_k` have no effect and are absent. Names as in
    `CrossAttention`, so the original tensors load under their own keys with no product computed at load."""

    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        self.to_v = Linear(context_dim, heads * dim_head, bias=False)
        self.to_out = nn.Sequential(Linear(heads * dim_head, dim))

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        """(n, context_dim) tokens -> (n, dim): the attention output for each, in the original's order of products."""
        return self.to_out(self.to_v(token))
