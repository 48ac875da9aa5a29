"""SVD's autoencoder: the SD image `Encoder` (conditioning latent) and the temporal `VideoDecoder` (or, in the
`*_image_decoder` checkpoints, the SD image `Decoder` run frame by frame: `FrameDecoder`).

Reproduces sgm `diffusionmodules/model.py` (`Encoder`, `ResnetBlock`, `AttnBlock`, `Downsample`, `Upsample`) and
`autoencoding/temporal_ae.py` (`VideoDecoder` with time_mode "conv-only", `VideoResBlock`, `AE3DConv`); module
names equal the original checkpoint keys without their file prefix (see vae_keymap.py). Activations are
`(b t) c h w`, frames of one video contiguous. No container module: the pipeline holds the encoder, the
`quant_conv` and the decoder, and `encode_condition` / `decode_latents` are the two ways SVD uses them.
"""
import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import kernels
from .attention import attention
from .layers import Conv2d, Conv3d, GroupNorm, ResBlock


@dataclass(frozen=True)
class VAEConfig:
    """sgm `ddconfig` of SVD's first stage (encoder and decoder share it); defaults are SVD's network.

    `from_dict` accepts sgm's `params` (decoder or encoder): keys that are not fields (`attn_type`, `double_z`,
    `resolution`, `attn_resolutions`, `dropout`) are dropped; SVD fixes them to vanilla / True / - / [] / 0.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    video_kernel_size: tuple[int, ...] = (3, 1, 1)
    scale_factor: float = 0.18215

    def __post_init__(self):
        for name in ("ch_mult", "video_kernel_size"):
            value = getattr(self, name)
            if (not isinstance(value, (list, tuple)) or not value
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
                raise ValueError(f"VAEConfig.{name} must be a non-empty sequence of positive ints, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("ch", "num_res_blocks", "z_channels", "in_channels", "out_ch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"VAEConfig.{name} must be a positive int, got {value!r}")
        if self.ch % 32:
            raise ValueError(f"VAEConfig.ch={self.ch} must be a multiple of 32: every norm is GroupNorm(32, C) and "
                             "the encoder's first level has ch channels")
        if len(self.video_kernel_size) != 3 or any(k % 2 == 0 for k in self.video_kernel_size):
            raise ValueError(f"VAEConfig.video_kernel_size must be 3 odd ints (t, h, w), got {self.video_kernel_size}")
        sf = self.scale_factor
        if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not math.isfinite(sf) or sf <= 0:
            raise ValueError(f"VAEConfig.scale_factor must be a positive finite number, got {sf!r}")

    @classmethod
    def from_dict(cls, params: dict) -> "VAEConfig":
        """From sgm `first_stage_config.params.{decoder,encoder}_config.params` (or any dict); extra keys ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of each resolution level, finest first."""
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def downscale(self) -> int:
        """Image size / latent size."""
        return 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    """sgm `Normalize`: GroupNorm(32 groups, eps 1e-6), plain torch (no fp32 upcast, unlike GroupNorm32)."""
    return GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """sgm `model.ResnetBlock` without timestep embedding (temb_channels=0): GN-SiLU-conv twice plus shortcut."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SiLU and the sum in place on fresh tensors (the norms' and conv2's outputs); x itself is never written;
        # h rebound after each norm, so conv1's output dies before conv2 runs
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = F.silu(self.norm2(h), inplace=True)
        h = self.conv2(h)  # dropout (p=0) between norm2 and conv2 in the original
        return h.add_(self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)


class VideoResBlock(ResnetBlock):
    """sgm `temporal_ae.VideoResBlock`: spatial ResnetBlock, then a (3,1,1) ResBlock over frames, learned blend.

    The blend weights the *temporal* branch by sigmoid(mix_factor), the opposite of the UNet's AlphaBlender.
    `time_stack` and `mix_factor` sit beside norm1/conv1/... because that is the checkpoint's key layout.
    """

    def __init__(self, c_in: int, c_out: int, video_kernel_size: tuple[int, ...]):
        super().__init__(c_in, c_out)
        # GroupNorm32 (eps 1e-5, fp32) inside, no timestep embedding, identity skip
        self.time_stack = ResBlock(c_out, 0, dims=3, kernel_size=video_kernel_size, skip_t_emb=True)
        self.mix_factor = nn.Parameter(torch.zeros(1))  # sgm's init (alpha 0.0); the checkpoint overwrites it

    def forward(self, x, num_frames: int) -> torch.Tensor:
        """x: (b t) c h w, or a list holding only it, which the block empties (x then dies after the spatial
        block, before the temporal one)."""
        return self.temporal(self.spatial(x.pop() if isinstance(x, list) else x), num_frames)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial ResnetBlock: each frame alone; a fresh (b t) c h w tensor."""
        return super().forward(x)

    def temporal(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The (3,1,1) ResBlock over frames and the blend, into x (the spatial block's output), which it returns."""
        x_spatial = rearrange(x, "(b t) c h w -> b c t h w", t=num_frames)  # a view of it
        # alpha (x + r) + (1 - alpha) x = x + alpha r, alpha one number per layer: one pass, into x's own memory,
        # so the result stays (b t) c h w contiguous (no copy back, plain layout for the next convs)
        alpha = torch.sigmoid(self.mix_factor).to(x.dtype)
        x_spatial.addcmul_(self.time_stack.branch(x_spatial), alpha)
        return x


class AttnBlock(nn.Module):
    """sgm `model.AttnBlock`: single-head self-attention over the h*w positions of each frame, 1x1-conv q/k/v/out."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        height, width = h.shape[-2:]
        # one head of width C, scale C**-0.5
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        h = rearrange(attention(q, k, v), "b 1 (h w) c -> b c h w", h=height, w=width)
        return self.proj_out(h).add_(x)


class Downsample(nn.Module):
    """sgm `model.Downsample`: zero-pad right and bottom by 1, then 3x3 conv with stride 2 and no padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric, unlike the UNet's padding=1


class Upsample(nn.Module):
    """sgm `model.Upsample`: nearest-neighbour x2, then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AE3DConv(Conv2d):
    """sgm `temporal_ae.AE3DConv`: a 2-D conv whose output is replaced by a Conv3d over frames (`time_mix_conv`)."""

    def __init__(self, c_in: int, c_out: int, video_kernel_size: tuple[int, ...]):
        super().__init__(c_in, c_out, 3, padding=1)
        padding = tuple(k // 2 for k in video_kernel_size)
        self.time_mix_conv = Conv3d(c_out, c_out, video_kernel_size, padding=padding)

    def forward(self, x, num_frames: int) -> torch.Tensor:
        """x: (b t) c h w, or a list holding only it, which the layer empties."""
        return self.temporal(self.spatial(x.pop() if isinstance(x, list) else x), num_frames)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The 2-D convolution, each frame alone."""
        return super().forward(x)

    def temporal(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The Conv3d over frames, (b t) c h w in and out."""
        x = rearrange(x, "(b t) c h w -> b c t h w", t=num_frames)
        return rearrange(self.time_mix_conv(x), "b c t h w -> (b t) c h w")


def _container(**children: nn.Module) -> nn.Module:
    """A bare nn.Module holding named children: only exists so names match the checkpoint (`mid.block_1`, ...)."""
    module = nn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


class Encoder(nn.Module):
    """sgm `model.Encoder` (double_z, attention only in the mid block): image (n, 3, H, W) -> (n, 2z, H/f, W/f).

    The output holds the posterior's moments: mean = the first z channels, log-variance = the rest.
    """

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        cfg, widths = config, config.widths
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = cfg.ch
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c, width))
                c = width
            # `down.{i}.attn` of the original is an empty ModuleList (attn_resolutions=[]): no keys, omitted
            level_module = _container(block=blocks)
            if level != len(widths) - 1:
                level_module.downsample = Downsample(c)
            self.down.append(level_module)
        self.mid = _container(block_1=ResnetBlock(c, c), attn_1=AttnBlock(c), block_2=ResnetBlock(c, c))
        self.norm_out = _norm(c)
        self.conv_out = Conv2d(c, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


def _up_levels(widths, num_res_blocks: int, block) -> tuple[nn.ModuleList, int]:
    """The decoders' `up` levels: num_res_blocks + 1 `block(c_in, c_out)` per level and an Upsample on all but the
    finest, built coarsest first and stored finest first as in sgm (`up.0`); returns them and the final width."""
    levels, c = [], widths[-1]
    for level in reversed(range(len(widths))):
        blocks = nn.ModuleList()
        for _ in range(num_res_blocks + 1):
            blocks.append(block(c, widths[level]))
            c = widths[level]
        level_module = _container(block=blocks)
        if level != 0:
            level_module.upsample = Upsample(c)
        levels.insert(0, level_module)
    return nn.ModuleList(levels), c


class VideoDecoder(nn.Module):
    """sgm `temporal_ae.VideoDecoder` (time_mode "conv-only"): latents ((b t), z, h, w) -> frames ((b t), 3, f*h, f*w).

    `num_frames` is the number of frames per video in the batch (sgm's `timesteps`); the temporal convs
    zero-pad at the first and last frame of each video.
    """

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        cfg, widths, vks = config, config.widths, config.video_kernel_size
        c = widths[-1]
        self.conv_in = Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _container(block_1=VideoResBlock(c, c, vks), attn_1=AttnBlock(c), block_2=VideoResBlock(c, c, vks))
        self.up, c = _up_levels(widths, cfg.num_res_blocks, lambda c_in, c_out: VideoResBlock(c_in, c_out, vks))
        self.norm_out = _norm(c)
        self.conv_out = AE3DConv(c, cfg.out_ch, vks)

    def forward(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        if num_frames <= 0 or z.shape[0] % num_frames:
            raise ValueError(f"z has {z.shape[0]} rows, not a multiple of num_frames={num_frames} "
                             "(layout is (b t) c h w)")
        per_batch = kernels.decode_frames(z, self.frame_bytes(z))
        if per_batch < z.shape[0]:
            return self.forward_in_sub_batches(z, num_frames, per_batch)
        h = z
        for layer in self.layers():
            if isinstance(layer, (VideoResBlock, AE3DConv)):
                held = [h]  # handed over (the layer empties it): its input dies after the layer's spatial part
                del h
                h = layer(held, num_frames)
            else:
                h = layer(h)
        return h

    def layers(self) -> list:
        """Every layer in execution order (sgm's forward): the blocks, upsamplings, output norm, SiLU and conv."""
        layers = [self.conv_in, self.mid.block_1, self.mid.attn_1, self.mid.block_2]
        for level in reversed(self.up):
            layers += list(level.block) + ([level.upsample] if hasattr(level, "upsample") else [])
        return layers + [self.norm_out, functools.partial(F.silu, inplace=True), self.conv_out]

    def forward_in_sub_batches(self, z: torch.Tensor, num_frames: int, per_batch: int) -> torch.Tensor:
        """`forward` with its per-frame work `per_batch` frames at a time. The layers fall into stages: per-frame
        steps (convolutions, norms, attention, upsampling: each frame alone), then one step over frames (the
        (3,1,1) ResBlock and blend of a VideoResBlock, the output's Conv3d), which runs on the whole chunk."""
        stages, per_frame = [], []
        for layer in self.layers():
            if isinstance(layer, (VideoResBlock, AE3DConv)):
                stages.append((per_frame + [layer.spatial], layer.temporal))
                per_frame = []
            else:
                per_frame.append(layer)
        h = z
        for steps, over_frames in stages:
            held = [h]  # handed over (`run_frames` empties it): the stage's input dies with its last sub-batch
            del h
            h = over_frames(self.run_frames(steps, held, per_batch), num_frames)
        return h

    def frame_bytes(self, z: torch.Tensor) -> int:
        """Bytes of one frame of the decoder's widest full-resolution activation (the input of `up.0.block.0`)."""
        scale = 2 ** (len(self.up) - 1)
        channels = self.up[0].block[0].norm1.num_channels
        return channels * z.shape[-2] * scale * z.shape[-1] * scale * self.conv_in.weight.element_size()

    @staticmethod
    def run_frames(steps: list, held: list, per_batch: int) -> torch.Tensor:
        """The per-frame steps on x ((b t) c h w; `held` = [x], emptied), `per_batch` frames at a time, each
        sub-batch's result written into one output: only one sub-batch's intermediates exist at once (the
        full-resolution 256-channel tensors of a whole chunk, 8 GiB at 1024x576 x 14 frames, never do)."""
        x = held.pop()
        out = None
        for start in range(0, x.shape[0], per_batch):
            part = x[start:start + per_batch]
            for step in steps:
                part = step(part)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[start:start + per_batch] = part
        return out


class Decoder(nn.Module):
    """sgm `model.Decoder` (attention only in the mid block): latents (n, z, h, w) -> images (n, 3, f*h, f*w).

    The plain SD decoder of the `*_image_decoder` checkpoints: `VideoDecoder` without its temporal layers."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        cfg, widths = config, config.widths
        c = widths[-1]
        self.conv_in = Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _container(block_1=ResnetBlock(c, c), attn_1=AttnBlock(c), block_2=ResnetBlock(c, c))
        self.up, c = _up_levels(widths, cfg.num_res_blocks, ResnetBlock)
        self.norm_out = _norm(c)
        self.conv_out = Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class FrameDecoder(nn.Module):
    """The `*_image_decoder` checkpoints' first stage as SVD runs it: `post_quant_conv` then the 2-D `Decoder`,
    every frame on its own (sgm `AutoencoderKL.decode`). Same call as `VideoDecoder`; `num_frames` is unused
    because nothing mixes frames, so the video is decoded without temporal smoothing."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.post_quant_conv = Conv2d(config.z_channels, config.z_channels, 1)
        self.decoder = Decoder(config)

    def forward(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def make_quant_conv(config: VAEConfig = VAEConfig()) -> nn.Conv2d:
    """The conditioner's `quant_conv` (1x1, 2z -> 2z) that follows the encoder on the conditioning path."""
    return Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)


def encode_condition(encoder: Encoder, quant_conv: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The conditioning latent: mode of the posterior of `quant_conv(encoder(image))`, unscaled.

    Reproduces sgm `AutoencoderKLModeOnly` as used by `VideoPredictionEmbedderWithEncoder` (conditioner
    embedder 3): encoder -> quant_conv -> DiagonalGaussian mode (= mean = the first z channels), times
    that engine's scale factor 1.0 (not 0.18215). Same as diffusers `vae.encode(x).latent_dist.mode()`.

    Args:
        image: (n, in_channels, H, W) in [-1, 1] (SVD adds the cond_aug noise before this call).
    Returns:
        (n, z_channels, H/f, W/f).
    """
    moments = quant_conv(encoder(image))
    return moments[:, : moments.shape[1] // 2]


def decode_latents(decoder: VideoDecoder, latents: torch.Tensor, num_frames: int, chunk_size: int,
                   scale_factor: float) -> torch.Tensor:
    """Latents -> frames in chunks of at most `chunk_size` consecutive frames of one video (sgm `decode_first_stage`).

    The latents are multiplied by 1/scale_factor (as sgm and diffusers write it), then each video's frames
    are cut into consecutive chunks [0, c), [c, 2c), ...; each chunk is decoded alone as a video of its own
    length (`num_frames` = chunk length), so the temporal convs zero-pad at chunk edges exactly as in the
    reference (T=25 with chunk 14 decodes 14 + 11 frames).

    sgm (`DiffusionEngine.decode_first_stage`, `en_and_decode_n_samples_a_time`) and diffusers
    (`StableVideoDiffusionPipeline.decode_latents`, `decode_chunk_size`) instead cut the flat `(b t)` batch
    and pass the chunk length as the frame count. That is the same thing whenever a chunk never straddles
    two videos: one video (what SVD's scripts decode), or `chunk_size` dividing `num_frames`. Otherwise
    their straddling chunk mixes the last frames of one video with the first of the next (and a chunk larger
    than one video is decoded as one long video); here a chunk never leaves its video.

    Args:
        latents: ((b t), z_channels, h, w), sampling latents (still multiplied by scale_factor).
        num_frames: t, frames per video.
        chunk_size: frames decoded per decoder call (sgm `decoding_t`, 14 in its script).
        scale_factor: the latent scale, 0.18215 for SVD.
    Returns:
        ((b t), out_ch, f*h, f*w), roughly in [-1, 1] (not clamped).
    """
    if num_frames <= 0 or latents.shape[0] % num_frames:
        raise ValueError(f"latents have {latents.shape[0]} rows, not a multiple of num_frames={num_frames}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of frames, got {chunk_size}")
    z = rearrange(latents * (1.0 / scale_factor), "(b t) c h w -> b t c h w", t=num_frames)
    frames = [decoder(video[start:start + chunk_size], video[start:start + chunk_size].shape[0])
              for video in z for start in range(0, num_frames, chunk_size)]
    return torch.cat(frames)  # video-major, chunks in order: back to (b t)


class ConditionEncoder(nn.Module):
    """The conditioning-latent encoder as one module, `encoder` + `quant_conv`: the layout of sgm's
    `conditioner.embedders.3.encoder` (AutoencoderKLModeOnly) and of diffusers' `vae/` encoder half."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.encoder = Encoder(config)
        self.quant_conv = make_quant_conv(config)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return encode_condition(self.encoder, self.quant_conv, image)
