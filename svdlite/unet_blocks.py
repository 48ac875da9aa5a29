"""The VideoUNet's blocks, with sgm's module names (VideoResBlock, SpatialVideoTransformer and the blocks inside it).

VCUT-native cross-attention. SVD's cross-attention context is one CLIP token, and softmax over a single key is
identically 1, so `attn2(x, c) = to_out(to_v(c))` for every query: a constant per frame (spatial blocks, each
frame's own token) or per video (temporal blocks, the first frame's token). `context_vector` computes it once per
video and the block forward only adds that vector where the attention output was added. With `product=True` (svdlite
files) the block holds the product `W_out W_v` and `b_out` as one Linear, `attn2_fold` (C x context_dim), computed
once by the converter; with `product=False` (original and diffusers files) it holds `attn2.to_v` and `attn2.to_out.0`
as they are (`SingleTokenAttention`), so loading computes no product, and the vector costs one more small
matrix-vector product per block and video. `to_q` and `to_k` never influence the output, and are never loaded.
`norm2` is kept (it fed only the ignored query) so the ablation that recomputes attention the original way has its
weights.

`fold=False` builds the original `attn2` instead (ablation only: it measures what the fold saves); the "context
vector" is then the raw CLIP token and the attention runs at every call, as in sgm. `SpatialVideoTransformer` also
takes `fold="temporal"`: only the temporal blocks are folded, the spatial ones keep the original `attn2` (the VCUT
paper's own variant).
"""
import torch
from einops import rearrange
from torch import nn

from .attention import CrossAttention, SelfAttention, SingleTokenAttention
from .layers import (Conv2d, FeedForward, GroupNorm32, LayerNorm, Linear, ResBlock, UpcastGroupNorm, conv_nd,
                     timestep_embedding)


def mix_factor_alpha(mix_factor: torch.Tensor, image_only_indicator: torch.Tensor) -> torch.Tensor:
    """sgm AlphaBlender ("learned_with_images"): alpha = 1 for image-only frames, else sigmoid(mix_factor); (b, t)."""
    return torch.where(image_only_indicator.bool(), torch.ones_like(image_only_indicator, dtype=torch.float32),
                       torch.sigmoid(mix_factor.float()))


class AlphaBlender(nn.Module):
    """out = alpha * spatial + (1 - alpha) * temporal; `mix_factor` is the checkpoint's learned scalar."""

    def __init__(self):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def forward(self, x_spatial, x_temporal, image_only_indicator, pattern: str):
        alpha = rearrange(mix_factor_alpha(self.mix_factor, image_only_indicator), pattern).to(x_spatial.dtype)
        # one fused pass (x_t + alpha (x_s - x_t)) instead of three, equal to float rounding; into x_temporal (the
        # temporal branch's fresh output) unless broadcasting needs a larger result
        if x_temporal.shape == torch.broadcast_shapes(x_temporal.shape, x_spatial.shape, alpha.shape):
            return x_temporal.lerp_(x_spatial, alpha)
        return torch.lerp(x_temporal, x_spatial, alpha)


class VideoResBlock(ResBlock):
    """Spatial ResBlock (its own keys), then the temporal 3-D ResBlock `time_stack`, blended by `time_mixer`.

    time_stack's skip is the identity, time_stack(x) = x + r, so for video frames the blend
    alpha x + (1 - alpha)(x + r) is x + (1 - alpha) r with alpha = sigmoid(mix_factor) one number per layer: one
    scaled add into r's fresh output, the pass the plain residual add would take anyway (exact up to float rounding;
    image-only frames, alpha = 1, keep x)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, *,
                 video_kernel_size=(3, 1, 1)):
        super().__init__(channels, emb_channels, out_channels)
        out_channels = out_channels or channels
        self.time_stack = ResBlock(out_channels, emb_channels, out_channels, dims=3, kernel_size=video_kernel_size,
                                   exchange_temb_dims=True)
        self.time_mixer = AlphaBlender()
        # True for a model loaded from an svdlite file written by an earlier converter, whose
        # time_stack.out_layers.3 holds (1 - alpha) W already (`loading.blend_is_stored_folded`; set at load)
        self.blend_folded = False

    def branch_scale(self, image_only_indicator: torch.Tensor) -> torch.Tensor:
        """(b, t) float32: the factor of time_stack's residual branch in the blend, 1 - alpha for video frames
        (1 if the file holds it folded in) and 0 for image-only frames. A tensor: no host sync, runs on meta."""
        if self.blend_folded:
            return 1.0 - image_only_indicator.bool().float()
        return 1.0 - mix_factor_alpha(self.time_mixer.mix_factor, image_only_indicator)

    def forward(self, x, emb, num_frames: int, image_only_indicator):
        x = super().forward(x, emb)
        x_spatial = rearrange(x, "(b t) c h w -> b c t h w", t=num_frames)
        r = self.time_stack.branch(x_spatial, rearrange(emb, "(b t) c -> b t c", t=num_frames))
        # x + (1 - alpha) r in one pass into r (autograd takes no out=: a fresh tensor when a side needs a gradient);
        # the scale in the model's dtype, as sgm's own blend computes it; image-only frames: x + 0 r = x
        scale = rearrange(self.branch_scale(image_only_indicator), "b t -> b 1 t 1 1").to(r.dtype)
        x = torch.addcmul(x_spatial, r, scale, out=None if r.requires_grad or x.requires_grad else r)
        return rearrange(x, "b c t h w -> (b t) c h w")


class _TransformerBlock(nn.Module):
    """What the spatial and temporal blocks share: attn1, the (folded) cross-attention, ff and norm1-3."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, fold: bool = True,
                 product: bool = True):
        super().__init__()
        self.fold, self.product = fold, product
        self.attn1 = SelfAttention(dim, heads, dim_head)
        if not fold:
            self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        elif product:
            self.attn2_fold = Linear(context_dim, dim)  # W_out W_v and b_out of the original attn2
        else:
            self.attn2 = SingleTokenAttention(dim, context_dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)

    def context_vector(self, token: torch.Tensor) -> torch.Tensor:
        """attn2's output for a single context token: (n, context_dim) -> (n, dim); the token itself unfolded."""
        if not self.fold:
            return token
        return self.attn2_fold(token) if self.product else self.attn2(token)


class BasicTransformerBlock(_TransformerBlock):
    """Spatial block over the h*w tokens of each frame: self-attention, folded cross-attention, GEGLU FF."""

    def forward(self, x: torch.Tensor, ctx_vec: torch.Tensor) -> torch.Tensor:
        """x: ((b t), h*w, C); ctx_vec: ((b t), C), one per frame."""
        # each sum goes into the branch's fresh output (or the previous sum), never into the block's input
        x = self.attn1(self.norm1(x)).add_(x)
        ctx = ctx_vec[:, None, :].to(x.dtype)
        x = x.add_(ctx) if self.fold else self.attn2(self.norm2(x), ctx).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class VideoTransformerBlock(_TransformerBlock):
    """Temporal block over the T frames at each position: ff_in, self-attention, folded cross-attention, FF."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, fold: bool = True,
                 product: bool = True):
        super().__init__(dim, heads, dim_head, context_dim, fold, product)
        self.norm_in = LayerNorm(dim)
        self.ff_in = FeedForward(dim)

    def forward(self, x: torch.Tensor, ctx_vec: torch.Tensor, num_frames: int, stats: dict | None = None
                ) -> torch.Tensor:
        """x: ((b t), S, C), or a list holding only it, which the block empties (so it dies once rearranged);
        ctx_vec: (b, C), one per video (from its first frame's token).

        stats: when a dict is given (F3 calibration only), `stats["attention"]` is set to the mean attention mass a
        frame's query puts on the OTHER frames (1 - the diagonal of the softmax map), over rows, heads and frames."""
        if isinstance(x, list):
            x = x.pop()
        b, s = x.shape[0] // num_frames, x.shape[1]
        x = rearrange(x, "(b t) s c -> (b s) t c", t=num_frames)
        x = self.ff_in(self.norm_in(x)).add_(x)  # sums into fresh tensors only, as in BasicTransformerBlock
        h = self.norm1(x)
        if stats is not None:
            stats["attention"] = 1.0 - self.attn1.probabilities(h).diagonal(dim1=-2, dim2=-1).mean().item()
        x = self.attn1(h).add_(x)
        if self.fold:  # frame 0's vector at every position and frame, broadcast without a copy
            x.view(b, s, num_frames, -1).add_(ctx_vec.to(x.dtype)[:, None, None, :])
        else:  # sgm repeats frame 0's token over the positions and attends to it
            x = self.attn2(self.norm2(x), ctx_vec.to(x.dtype).repeat_interleave(s, dim=0)[:, None, :]).add_(x)
        x = self.ff(self.norm3(x)).add_(x)
        return rearrange(x, "(b s) t c -> (b t) s c", s=s)


class SpatialVideoTransformer(nn.Module):
    """sgm SpatialVideoTransformer (linear proj_in/out, depth d): spatial blocks, each followed by a temporal
    block on x + frame-position embedding, blended by `time_mixer`."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 fold: bool | str = True, product: bool = True):
        """fold: True folds every cross-attention, False none, "temporal" only the temporal blocks' (`time_stack`);
        product: folded blocks hold `attn2_fold` (True) or `attn2.to_v`/`to_out` (False)."""
        super().__init__()
        if not (isinstance(fold, bool) or fold == "temporal"):
            raise ValueError(f"fold must be True, False or 'temporal', got {fold!r}")
        spatial_fold, temporal_fold = fold is True, fold is not False
        inner = heads * dim_head
        self.norm = UpcastGroupNorm(32, channels, eps=1e-6)
        self.proj_in = Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, spatial_fold, product) for _ in range(depth))
        self.time_stack = nn.ModuleList(
            VideoTransformerBlock(inner, heads, dim_head, context_dim, temporal_fold, product) for _ in range(depth))
        self.time_pos_embed = nn.Sequential(Linear(channels, 4 * channels), nn.SiLU(), Linear(4 * channels, channels))
        self.time_mixer = AlphaBlender()
        self.proj_out = Linear(inner, channels)

    def context_vectors(self, context: torch.Tensor, num_frames: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per depth: (spatial vector ((b t), C) from each frame's token, temporal vector (b, C) from frame 0's)."""
        token = context[:, 0]
        return [(blk.context_vector(token), mix.context_vector(token[::num_frames]))
                for blk, mix in zip(self.transformer_blocks, self.time_stack)]

    def frame_embedding(self, num_frames: int, num_rows: int, device, dtype) -> torch.Tensor:
        """The learned frame-position embedding added to the temporal blocks' input: (num_rows, 1, C)."""
        frames = torch.arange(num_frames, device=device).repeat(num_rows // num_frames)
        return self.time_pos_embed(timestep_embedding(frames, self.proj_in.in_features).to(dtype))[:, None, :]

    def forward(self, x, ctx_vecs, num_frames: int, image_only_indicator, skip=(), record: dict | None = None):
        """skip: depth indices d whose temporal block `time_stack.d` does not run at this call (F3-Pruning): the
        blend then takes the spatial path alone (alpha = 1), so x passes on unchanged.
        record: when a dict is given (F3 calibration), record[d] = {"attention", "contribution"} for every temporal
        block that runs; contribution = (1 - alpha) * ||temporal - spatial|| / ||spatial|| with this block's alpha."""
        _, _, h, w = x.shape
        x_in = x
        x = rearrange(self.norm(x), "n c h w -> n (h w) c")
        x = self.proj_in(x)
        emb = None
        for d, (block, mix_block, (spatial_vec, temporal_vec)) in enumerate(
                zip(self.transformer_blocks, self.time_stack, ctx_vecs)):
            x = block(x, spatial_vec)
            if d in skip:
                continue
            if emb is None:
                emb = self.frame_embedding(num_frames, x.shape[0], x.device, x.dtype)
            stats = None if record is None else record.setdefault(d, {})
            # the sum handed over in a list: it dies once the block has rearranged it (as an argument it would live
            # through the whole temporal block)
            x_mix = mix_block([x + emb], temporal_vec, num_frames, stats)
            if stats is not None:
                alpha = torch.sigmoid(self.time_mixer.mix_factor.float()).item()
                stats["contribution"] = ((1.0 - alpha) * (x_mix.float() - x.float()).norm() / x.float().norm()).item()
            x = self.time_mixer(x, x_mix, image_only_indicator, "b t -> (b t) 1 1")
        # contiguous: a channels-last view here would make every later conv re-layout its weights (~15% slower)
        x = rearrange(self.proj_out(x), "n (h w) c -> n c h w", h=h, w=w).contiguous()
        return x.add_(x_in)


class Downsample(nn.Module):
    """Stride-2 3x3 conv, symmetric padding 1 (`op`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2, then 3x3 conv (`conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv_nd(2, channels, channels, 3)

    def forward(self, x):
        return self.conv(nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A numbered block (`input_blocks.i`), passing each layer what it takes."""

    def forward(self, x, emb, ctx_vecs, num_frames: int, image_only_indicator, skip=(), record: dict | None = None):
        """x: the block's input, or a list holding only it, which the block empties (the input then dies after the
        first layer, not with the call); skip / record: passed to the block's SpatialVideoTransformer (see there)."""
        if isinstance(x, list):
            x = x.pop()
        for layer in self:
            if isinstance(layer, VideoResBlock):
                x = layer(x, emb, num_frames, image_only_indicator)
            elif isinstance(layer, SpatialVideoTransformer):
                x = layer(x, ctx_vecs, num_frames, image_only_indicator, skip, record)
            else:
                x = layer(x)
        return x


__all__ = ["AlphaBlender", "VideoResBlock", "BasicTransformerBlock", "VideoTransformerBlock",
           "SpatialVideoTransformer", "Downsample", "Upsample", "TimestepEmbedSequential", "GroupNorm32"]
