"""The SVD denoising network: `UNetConfig` and `VideoUNet` (sgm `video_model.VideoUNet`, module names kept).

Activations are `(b t) c h w`, frames of one video contiguous. Cross-attention is folded (see unet_blocks.py):
`context_vectors(context, T)` computes every block's vector once per video, and `forward` takes them.
"""
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .layers import GroupNorm32, Linear, conv_nd, timestep_embedding
from .unet_blocks import (Downsample, SpatialVideoTransformer, TimestepEmbedSequential, Upsample, VideoResBlock,
                          VideoTransformerBlock)

# Fixed by SVD's network; accepted in the config only with these values, so sgm's `params` load unchanged.
_FIXED = {
    "num_classes": ("sequential",),
    "use_linear_in_transformer": (True,),
    "extra_ff_mix_layer": (True,),
    "use_spatial_context": (True,),
    "merge_strategy": ("learned_with_images",),
    "spatial_transformer_attn_type": ("softmax", "softmax-xformers"),
    "dropout": (0, 0.0),
    "conv_resample": (True,),
    "dims": (2,),
    "use_scale_shift_norm": (False,),
    "resblock_updown": (False,),
    "time_downup": (False,),
    "disable_temporal_crossattention": (False,),
    "max_ddpm_temb_period": (10000,),
}


@dataclass(frozen=True)
class UNetConfig:
    """`VideoUNet` keyword arguments; defaults are SVD's network (identical for SVD, SVD-XT and SVD-XT 1.1)."""

    in_channels: int = 8
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    adm_in_channels: int = 768
    video_kernel_size: tuple[int, ...] = (3, 1, 1)
    num_classes: str = "sequential"
    use_linear_in_transformer: bool = True
    extra_ff_mix_layer: bool = True
    use_spatial_context: bool = True
    merge_strategy: str = "learned_with_images"
    spatial_transformer_attn_type: str = "softmax-xformers"
    use_checkpoint: bool = False  # gradient checkpointing in training; no effect on inference
    merge_factor: float = 0.5  # initial value of mix_factor only; the checkpoint overwrites it
    dropout: float = 0.0
    conv_resample: bool = True
    dims: int = 2
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    time_downup: bool = False
    disable_temporal_crossattention: bool = False
    max_ddpm_temb_period: int = 10000

    def __post_init__(self):
        for name in ("attention_resolutions", "channel_mult", "video_kernel_size"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and v > 0 for v in value):
                raise ValueError(f"UNetConfig.{name} must be a sequence of positive ints, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "num_head_channels",
                     "transformer_depth", "context_dim", "adm_in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"UNetConfig.{name} must be a positive int, got {value!r}")
        for name, allowed in _FIXED.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"UNetConfig.{name}={getattr(self, name)!r} is not supported; SVD's network "
                                 f"uses {allowed[0]!r}")
        if len(self.video_kernel_size) != 3 or any(k % 2 == 0 for k in self.video_kernel_size):
            raise ValueError(f"UNetConfig.video_kernel_size must be 3 odd ints (t, h, w), got {self.video_kernel_size}")
        for mult in self.channel_mult:
            width = mult * self.model_channels
            if width % 32:
                raise ValueError(f"channel width {width} (model_channels {self.model_channels} x mult {mult}) must be "
                                 "a multiple of 32 for GroupNorm(32)")
            if width % self.num_head_channels:
                raise ValueError(f"channel width {width} is not a multiple of num_head_channels "
                                 f"{self.num_head_channels}")

    @classmethod
    def from_dict(cls, params: dict) -> "UNetConfig":
        """From sgm `network_config.params` (or any dict): keys that are fields are kept, `target` etc. ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def latent_downscale(self) -> int:
        """The latent's height and width must be multiples of this (skip connections line up)."""
        return 2 ** (len(self.channel_mult) - 1)


class VideoUNet(nn.Module):
    """fold_cross_attention=False builds the original cross-attentions (ablation only, see unet_blocks.py);
    "temporal" folds only the temporal blocks' cross-attention (the VCUT paper's variant), spatial ones original.
    fold_product: folded blocks hold the product `attn2_fold` (True: svdlite files) or the original `attn2.to_v` and
    `attn2.to_out.0` (False: original and diffusers files, loaded without computing a product); same outputs."""

    def __init__(self, config: UNetConfig = UNetConfig(), *, fold_cross_attention: bool | str = True,
                 fold_product: bool = True):
        super().__init__()
        self.config = cfg = config
        self.fold_cross_attention = fold_cross_attention
        mc, ted = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.Sequential(Linear(mc, ted), nn.SiLU(), Linear(ted, ted))
        # `label_emb.0` is sgm's Sequential around the MLP ("sequential" class conditioning)
        self.label_emb = nn.Sequential(nn.Sequential(Linear(cfg.adm_in_channels, ted), nn.SiLU(), Linear(ted, ted)))

        def res(c_in, c_out):
            return VideoResBlock(c_in, ted, c_out, video_kernel_size=cfg.video_kernel_size)

        def svt(c):
            return SpatialVideoTransformer(c, c // cfg.num_head_channels, cfg.num_head_channels,
                                           cfg.transformer_depth, cfg.context_dim, fold_cross_attention, fold_product)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(2, cfg.in_channels, mc, 3))])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(svt(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), svt(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + chans.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(svt(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), conv_nd(2, mc, cfg.out_channels, 3))

    def named_blocks(self):
        """(name, block) for every numbered block in execution order: `input_blocks.i`, `middle_block`, ..."""
        yield from ((f"input_blocks.{i}", b) for i, b in enumerate(self.input_blocks))
        yield "middle_block", self.middle_block
        yield from ((f"output_blocks.{i}", b) for i, b in enumerate(self.output_blocks))

    def context_vectors(self, context: torch.Tensor, num_video_frames: int) -> dict[str, list]:
        """Every folded cross-attention's output, once per video: {block name: [(spatial, temporal)] per depth}.

        context: ((b t), 1, context_dim), the CLIP token per frame (zeros for the unconditional half).
        """
        if context.ndim != 3 or context.shape[1] != 1 or context.shape[2] != self.config.context_dim:
            raise ValueError(f"context must have shape ((b t), 1, {self.config.context_dim}): svdlite folds "
                             f"cross-attention over SVD's single CLIP token; got {tuple(context.shape)}")
        if context.shape[0] % num_video_frames:
            raise ValueError(f"context has {context.shape[0]} rows, not a multiple of "
                             f"num_video_frames={num_video_frames}")
        return {name: layer.context_vectors(context, num_video_frames)
                for name, block in self.named_blocks() for layer in block
                if isinstance(layer, SpatialVideoTransformer)}

    def temporal_units(self) -> list[str]:
        """Module paths of the temporal transformer blocks (`<block>.<j>.time_stack.<d>`) in execution order: the
        units F3-Pruning ranks and skips (16 in SVD's network)."""
        return [name for name, m in self.named_modules() if isinstance(m, VideoTransformerBlock)]

    def _per_block(self, units, what: str) -> dict[str, set[int]]:
        """{block name: depth indices} for unit paths `<block>.<j>.time_stack.<d>`; unknown paths are an error."""
        unknown = set(units) - set(self.temporal_units())
        if unknown:
            raise ValueError(f"{what}: {sorted(unknown)[:3]} are not temporal blocks of this network; its units are "
                             f"{self.temporal_units()[:2]} ... ({len(self.temporal_units())} in all)")
        out: dict[str, set[int]] = {}
        for unit in units:
            svt, d = unit.rsplit(".time_stack.", 1)
            out.setdefault(svt.rsplit(".", 1)[0], set()).add(int(d))
        return out

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor,
                num_video_frames: int, image_only_indicator: torch.Tensor | None = None,
                context_vectors: dict | None = None, *, skip_temporal=frozenset(), record: dict | None = None,
                cache_depth: int | None = None, cached: torch.Tensor | None = None):
        """sgm VideoUNet.forward. x ((b t), in_channels, h, w); timesteps ((b t),) = c_noise; context ((b t), 1, D)
        (unused when `context_vectors` from `context_vectors()` are passed); y ((b t), adm_in_channels);
        image_only_indicator (b, t), zeros (video) when None.

        The per-call options of the acceleration plan (svdlite.plan), all off by default (the exact network):
        skip_temporal: unit paths from `temporal_units()` whose temporal block does not run (F3-Pruning); the
            blend then keeps the spatial path alone (alpha = 1).
        record: a dict to fill with {unit: {"attention", "contribution"}} for every temporal block that runs
            (F3 calibration; costs an explicit softmax per block).
        cache_depth: step caching (DeepCache). With `cached=None` the whole network runs and the call returns
            (out, features): the features entering `output_blocks[n - 1 - cache_depth]` (n output blocks). With
            `cached` (such features from an earlier call on the same rows), only `input_blocks[0..cache_depth]`
            and `output_blocks[n - 1 - cache_depth..]` run, on their own skip connections, and the call returns
            (out, cached).
        """
        n, t = x.shape[0], num_video_frames
        if n % t:
            raise ValueError(f"x has {n} rows, not a multiple of num_video_frames={t} (layout is (b t) c h w)")
        if x.shape[-2] % self.config.latent_downscale or x.shape[-1] % self.config.latent_downscale:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} must be a multiple of {self.config.latent_downscale}")
        n_out = len(self.output_blocks)
        if cache_depth is not None and not 0 <= cache_depth < n_out:
            raise ValueError(f"cache_depth must be in [0, {n_out - 1}], got {cache_depth}")
        if cached is not None and cache_depth is None:
            raise ValueError("cached features need their cache_depth")
        if context_vectors is None:
            context_vectors = self.context_vectors(context, t)
        if image_only_indicator is None:
            image_only_indicator = torch.zeros(n // t, t, device=x.device)
        skips_by_block = self._per_block(skip_temporal, "skip_temporal") if skip_temporal else {}
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(x.dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y.to(x.dtype))

        def run(name, block, h):
            rec = None if record is None else {}
            h = block(h, emb, context_vectors.get(name), t, image_only_indicator, skips_by_block.get(name, ()), rec)
            for d, stats in (rec or {}).items():
                j = next(j for j, layer in enumerate(block) if isinstance(layer, SpatialVideoTransformer))
                record[f"{name}.{j}.time_stack.{d}"] = stats
            return h

        first_out = 0 if cached is None else n_out - 1 - cache_depth
        skips, h = [], x
        for i, block in enumerate(self.input_blocks[:len(self.input_blocks) - first_out]):
            h = run(f"input_blocks.{i}", block, h)
            skips.append(h)
        h = run("middle_block", self.middle_block, h) if cached is None else cached
        features = cached
        for i in range(first_out, n_out):
            if i == n_out - 1 - (cache_depth or 0) and features is None:
                features = h
            # the concatenation handed over in a list the block empties: it dies once the block's first layer has
            # read it, and h (rebound to the list) once the concatenation is made; held as arguments, both would
            # stay live through the block's transformer (1.4 GiB at SVD-XT 1024x576 x 25 frames, docs/memory.md)
            h = [torch.cat([h, skips.pop()], dim=1)]
            h = run(f"output_blocks.{i}", self.output_blocks[i], h)
        out = self.out(h)
        return out if cache_depth is None else (out, features)
