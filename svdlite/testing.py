"""Random-weight checkpoints for tests, benchmarks and the bundled tiny model (never for real use), and the pieces
the tests and tools share: the inputs of one guided UNet call, a recorder of module outputs, and a diffusers SVD
pipeline folder with random weights (`write_diffusers_pipeline`; it needs the `test` extra, diffusers and
transformers, imported inside it: svdlite itself never imports them).

`random_tensors` follows the recipe of tests/reference/materialize.py, so every branch is live (sgm's own
zero-inits would hide mistakes): norm scales ~1, biases small, weights ~ N(0, 1/fan_in), mix factors ~0.3.
"""
import math

import torch

from .layers import timestep_embedding
from .unet import UNetConfig, VideoUNet
from .unet_keymap import original_unet_keys


def random_tensors(shapes: dict, seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """{key: tensor} for {key: shape}, drawn in sorted key order from one generator seeded `seed`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        r = torch.randn(tuple(shape), generator=g)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "mix_factor":
            v = 0.3 + 0.5 * r
        elif len(shape) == 1 and leaf == "weight":
            v = 1.0 + 0.1 * r
        elif leaf == "bias":
            v = 0.05 * r
        else:
            v = r / math.sqrt(math.prod(shape[1:]))
        out[key] = v.to(dtype).contiguous()
    return out


def original_unet_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    """{sgm key (unprefixed): shape} of the original VideoUNet for `config`, cross-attention tensors included."""
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in VideoUNet(config).state_dict().items()}
    shapes = {}
    for key in original_unet_keys(ours):
        if ".attn2." not in key:
            shapes[key] = ours[key]
            continue
        base, leaf = key.split(".attn2.")
        c, d = ours[base + ".attn2_fold.weight"]
        shapes[key] = {"to_q.weight": (c, c), "to_k.weight": (c, d), "to_v.weight": (c, d),
                       "to_out.0.weight": (c, c), "to_out.0.bias": (c,)}[leaf]
    return shapes


def original_checkpoint_shapes(unet_config: UNetConfig | None = None, vae_config=None, clip_config=None,
                               components=("unet", "vae_encoder", "vae_decoder", "image_encoder"),
                               extras: bool = True) -> dict[str, tuple[int, ...]]:
    """{full key: shape} of an original single file (svd*.safetensors) for these configs and components.

    extras adds the tensors such files hold that svdlite never reads: the first_stage_model encoder copy, the
    conditioner's 2-D decoder and post_quant_conv, and OpenCLIP text-side leftovers (a sample of each)."""
    from . import clip_keymap, vae_keymap
    from .clip import CLIPVisionConfig, build_image_encoder
    from .unet_keymap import ORIGINAL_PREFIX
    from .vae import ConditionEncoder, VAEConfig, VideoDecoder

    vae_config, clip_config = vae_config or VAEConfig(), clip_config or CLIPVisionConfig()
    shapes = {}
    with torch.device("meta"):
        if "unet" in components:
            unet_shapes = original_unet_shapes(unet_config or UNetConfig())
            shapes.update({ORIGINAL_PREFIX + k: v for k, v in unet_shapes.items()})
        if "vae_encoder" in components:
            for k, v in ConditionEncoder(vae_config).state_dict().items():
                prefix, rest = k.split(".", 1)
                full = (vae_keymap.ENCODER_PREFIX if prefix == "encoder" else vae_keymap.QUANT_CONV_PREFIX) + rest
                shapes[full] = tuple(v.shape)
                if extras and prefix == "encoder":
                    shapes[vae_keymap.FIRST_STAGE_ENCODER_PREFIX + rest] = tuple(v.shape)
        if "vae_decoder" in components:
            shapes.update({vae_keymap.DECODER_PREFIX + k: tuple(v.shape)
                           for k, v in VideoDecoder(vae_config).state_dict().items()})
        if "image_encoder" in components:
            shapes.update({clip_keymap.ORIGINAL_PREFIX + k: tuple(v.shape)
                           for k, v in build_image_encoder(clip_config).state_dict().items()})
    if extras:
        shapes["conditioner.embedders.3.encoder.post_quant_conv.weight"] = (vae_config.z_channels,) * 2 + (1, 1)
        shapes["conditioner.embedders.3.encoder.decoder.conv_in.weight"] = (vae_config.ch, vae_config.z_channels, 3, 3)
        shapes["conditioner.embedders.0.open_clip.model.token_embedding.weight"] = (16, clip_config.output_dim)
        shapes["conditioner.embedders.0.open_clip.model.logit_scale"] = ()
    return shapes


def unet_call_inputs(config: UNetConfig, frames: int, height: int, width: int, seed: int) -> dict:
    """Inputs of one CFG-doubled UNet call, [uncond; cond] videos (uncond context zero, as sgm and diffusers), float32
    on the CPU, in diffusers' layout and svdlite's (the benchmarks' and the GPU check's common inputs)."""
    multiple = 8 * config.latent_downscale
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {multiple} pixels, got {height}x{width}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    g = torch.Generator().manual_seed(seed + 1)
    b, t, h, w = 2, frames, height // 8, width // 8
    sample = torch.randn(b, t, config.in_channels, h, w, generator=g)
    sigma = torch.tensor([3.0, 3.0])
    timestep = 0.25 * sigma.log()
    token = torch.randn(1, 1, config.context_dim, generator=g)
    context = torch.cat([torch.zeros_like(token), token])  # (b, 1, D)
    added_time_ids = torch.tensor([[6.0, 127.0, 0.02]] * b)  # fps_id, motion bucket, noise aug
    dim = config.adm_in_channels // 3
    y = torch.cat([timestep_embedding(added_time_ids[:, i], dim) for i in range(3)], dim=1)
    return {"diffusers": (sample, timestep, context, added_time_ids),
            "svdlite": (sample.flatten(0, 1), timestep.repeat_interleave(t), context.repeat_interleave(t, 0),
                        y.repeat_interleave(t, 0)),
            "frames": t}


def block_outputs(model: torch.nn.Module, keys, run) -> dict[str, torch.Tensor]:
    """Outputs of the submodules named by reference keys (`<module path>.out`, or a bare path) during `run()`.

    Each output is recorded as a copy (each tensor of a tuple): a later in-place op (the VAE decoder's SiLU right
    after `norm_out`) must not change what the module returned."""
    got, hooks = {}, []

    def copy(out):
        if isinstance(out, torch.Tensor):
            return out.detach().clone()
        if isinstance(out, (tuple, list)):
            return type(out)(copy(o) for o in out)
        return out

    for key in keys:
        module = model.get_submodule(key.removesuffix(".out"))
        hooks.append(module.register_forward_hook(lambda m, a, out, key=key: got.__setitem__(key, copy(out))))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return got


# SVD's scheduler/scheduler_config.json (stabilityai/stable-video-diffusion-img2vid[-xt]); the DDPM-only keys
# set_alpha_to_one, skip_prk_steps, clip_sample are not EulerDiscreteScheduler arguments and are left out
DIFFUSERS_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           prediction_type="v_prediction", interpolation_type="linear", use_karras_sigmas=True,
                           sigma_min=0.002, sigma_max=700.0, timestep_spacing="leading", timestep_type="continuous",
                           steps_offset=1)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter of `module` replaced in place by `random_tensors(..., seed)` of its shapes."""
    params = dict(module.named_parameters())
    values = random_tensors({k: tuple(p.shape) for k, p in params.items()}, seed)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(values[k])


def write_diffusers_pipeline(folder, width: str, seed: int, *, num_frames: int = 14, fp16: bool = True) -> None:
    """A diffusers SVD pipeline folder (`StableVideoDiffusionPipeline.save_pretrained`) at SVD's width ("full") or a
    tiny one ("tiny"), every parameter random (`random_tensors`, seeds seed + 1000, 1001, 1002 for the UNet, VAE and
    CLIP: diffusers' own init zeroes mix factors and several projections, which would hide mistakes); fp16 variant
    files as the released checkpoints ship, or float32. num_frames: the UNet config's default frame count (a run's
    own count is an argument of the call). The scheduler is SVD's (`DIFFUSERS_SCHEDULER`).

    Needs the `test` extra (diffusers, transformers), imported here: the whole-run benchmark
    (tools/bench_generate.py) and tests/test_pipeline_diffusers.py build their pipelines with it."""
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                           UNetSpatioTemporalConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    if width == "full":
        unet = UNetSpatioTemporalConditionModel(num_frames=num_frames)  # diffusers' defaults are SVD's network
        # SVD's vae/config.json (diffusers' defaults are a one-level autoencoder)
        vae = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * 4,
                                           block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                           latent_channels=4)
        clip = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
                                num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu",
                                layer_norm_eps=1e-5)
    elif width == "tiny":
        unet = UNetSpatioTemporalConditionModel(
            sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 32, 64, 64),
            num_attention_heads=(2, 2, 4, 4), layers_per_block=1, transformer_layers_per_block=1,
            cross_attention_dim=48, addition_time_embed_dim=256, projection_class_embeddings_input_dim=768,
            num_frames=num_frames)
        vae = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * 4,
                                           block_out_channels=(32, 32, 64, 64), layers_per_block=2, latent_channels=4,
                                           sample_size=64)
        clip = CLIPVisionConfig(hidden_size=32, intermediate_size=128, projection_dim=48, num_hidden_layers=2,
                                num_attention_heads=4, image_size=224, patch_size=14, hidden_act="gelu",
                                layer_norm_eps=1e-5)
    else:
        raise ValueError(f"width is 'full' or 'tiny', got {width!r}")
    image_encoder = CLIPVisionModelWithProjection(clip)
    for i, module in enumerate((unet, vae, image_encoder)):
        _randomize(module, seed + 1000 + i)
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=image_encoder, unet=unet,
                                        scheduler=EulerDiscreteScheduler(**DIFFUSERS_SCHEDULER),
                                        feature_extractor=CLIPImageProcessor())
    if fp16:
        pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    else:
        pipe.save_pretrained(folder)


def encoder_outputs(encoder, quant_conv, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The VAE encoder's outputs that tests/reference stores for input x (vae_encoder_tiny_io.safetensors): the
    moments, their mean (the mode), both after quant_conv, the last through `vae.encode_condition`."""
    from .vae import encode_condition

    with torch.no_grad():
        moments = encoder(x)  # mean and log-variance, half the channels each
        return {"moments": moments, "mode": moments[:, :moments.shape[1] // 2],
                "moments_quant_conv": quant_conv(moments), "mode_quant_conv": encode_condition(encoder, quant_conv, x)}

