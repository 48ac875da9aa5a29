"""VAE: Encoder / quant_conv / VideoDecoder against the original sgm code, against diffusers, and at full size.

Reference tolerance: atol = rtol = 1e-4 for single forwards. The reference README puts the float32 noise floor of
these computations at ~1e-5 relative (running sgm with 1 instead of 2 threads moves the decoder `out` by 3.7e-6);
1e-4 leaves ~25x headroom over that floor and still catches structural mistakes (swapping the blend's two weights
moves the decoder `out` by 0.42 relative). It cannot tell a GroupNorm eps of 1e-5 from 1e-6 on O(1) activations.
Measured worst errors (torch 2.14.1, CPU; abs / relative to the reference's max magnitude): decoder `out` 3.9e-6 /
1.2e-6, `b2.out` 3.5e-6 / 1.1e-6, per-block 8.3e-6 / 7.2e-7 (`up.2.block.2`, values up to 11.6; worst relative is
`conv_out` 1.2e-6), encoder `moments` and `mode` 2.2e-6 / 8.7e-7, `moments_quant_conv` and `mode_quant_conv`
2.3e-6 / 1.3e-6, decode_latents vs the sampling run's `decoded` 2.6e-6 / 7.2e-7.
"""
import csv
import dataclasses
import re
import types

import pytest
import torch
from conftest import rel_err
from helpers import KEYMAPS, random_tensors
from safetensors.torch import load_file

from svdlite.testing import block_outputs, encoder_outputs
from svdlite.vae import Encoder, VAEConfig, VideoDecoder, decode_latents, encode_condition, make_quant_conv
from svdlite.vae_keymap import (DECODER_PREFIX, ENCODER_PREFIX, FIRST_STAGE_ENCODER_PREFIX, QUANT_CONV_PREFIX,
                                original_from_diffusers, to_diffusers_shape, vae_key_map)

ATOL = RTOL = 1e-4
KEYMAP_TSV = KEYMAPS / "svd_vae_key_map.tsv"
# sgm ddconfig keys that are not VAEConfig fields: svdlite implements only SVD's values of them
SVD_FIXED = {"attn_type": "vanilla", "double_z": True, "attn_resolutions": [], "dropout": 0.0,
             "alpha": 0.0, "merge_strategy": "learned", "time_mode": "conv-only"}


def _config(section: dict) -> VAEConfig:
    """VAEConfig from one `vae_tiny_config.json` section, after checking the dropped keys hold SVD's values."""
    params = {**section.get("implicit_defaults", {}), **section["params"]}
    for key, value in SVD_FIXED.items():
        assert params.get(key, value) == value, f"reference {key}={params[key]!r}; svdlite implements {value!r}"
    return VAEConfig.from_dict(params)


def _split(state_dict: dict, prefixes: list[str]) -> list[dict]:
    """Strip each prefix off its keys; every key must belong to exactly one prefix."""
    parts = [{k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)} for p in prefixes]
    assert sum(map(len, parts)) == len(state_dict), sorted(k for k in state_dict if not k.startswith(tuple(prefixes)))
    return parts


def _load(module: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    module.load_state_dict(state_dict, strict=True)
    return module.eval()


# ---------------------------------------------------------------------------------------------- sgm reference


@pytest.fixture(scope="module")
def decoder(reference):
    cfg = _config(reference.json("vae_tiny_config.json")["decoder"])
    (sd,) = _split(load_file(str(reference.weights("vae_decoder_tiny_sgm.safetensors"))), [DECODER_PREFIX])
    return _load(VideoDecoder(cfg), sd)


@pytest.fixture(scope="module")
def decoder_io(reference):
    return reference.tensors("vae_decoder_tiny_io.safetensors")


@pytest.mark.reference
@pytest.mark.parametrize("case", ["", "b2."])  # 1 video, then 2 videos of `timesteps` frames each
def test_decoder_matches_sgm(decoder, decoder_io, case):
    t = int(decoder_io["timesteps"])
    with torch.no_grad():
        out = decoder(decoder_io[case + "z"], t)
    torch.testing.assert_close(out, decoder_io[case + "out"], atol=ATOL, rtol=RTOL)


@pytest.mark.reference
def test_decoder_every_block_matches_sgm(decoder, decoder_io, reference):
    blocks = reference.tensors("vae_decoder_tiny_blocks.safetensors")
    got = block_outputs(decoder, blocks, lambda: decoder(decoder_io["z"], int(decoder_io["timesteps"])))
    assert set(got) == set(blocks)
    for key, ref in blocks.items():
        torch.testing.assert_close(got[key], ref, atol=ATOL, rtol=RTOL, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.reference
def test_decode_latents_matches_sgm_decode_first_stage(decoder, reference):
    """The sampling run's `decoded` = VideoDecoder(samples / scale_factor, timesteps=T) in one call."""
    io, run = reference.tensors("sample_tiny_io.safetensors"), reference.json("sample_tiny_config.json")
    t = run["guider"]["num_frames"]
    scale = reference.json("vae_tiny_config.json")["scale_factor"]
    with torch.no_grad():
        out = decode_latents(decoder, io["samples"], t, t, scale)
    torch.testing.assert_close(out, io["decoded"], atol=ATOL, rtol=RTOL)


@pytest.mark.reference
def test_encoder_matches_sgm(reference):
    cfg = _config(reference.json("vae_tiny_config.json")["encoder"])
    sd = load_file(str(reference.weights("vae_encoder_tiny_sgm.safetensors")))
    enc_sd, qc_sd = _split(sd, [FIRST_STAGE_ENCODER_PREFIX, QUANT_CONV_PREFIX])
    encoder, quant_conv = _load(Encoder(cfg), enc_sd), _load(make_quant_conv(cfg), qc_sd)
    io = reference.tensors("vae_encoder_tiny_io.safetensors")
    assert encoder.conv_out.out_channels == 2 * cfg.z_channels  # moments: mean and log-variance, z channels each
    for key, value in encoder_outputs(encoder, quant_conv, io["x"]).items():
        torch.testing.assert_close(value, io[key], atol=ATOL, rtol=RTOL, msg=lambda m, key=key: f"{key}: {m}")


# ---------------------------------------------------------------------------------------------- diffusers
# Same maths in float32 (diffusers' eps values equal sgm's here: 1e-6 spatial, 1e-5 temporal); only the attention
# kernel call and the order of operations differ, so the same 1e-4 noise-floor tolerance as above applies.
# Measured worst abs / relative errors: encode mode 1.4e-6 / 7.7e-7, decode (1 and 2 videos) 5.4e-6 / 1.4e-6,
# chunked pipeline decode_latents 2.7e-6 / 7.7e-7.
DF_TOL = 1e-4


@pytest.fixture(scope="module")
def diffusers_pair():
    import diffusers  # test extra; the package itself never imports it

    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLTemporalDecoder(
        block_out_channels=tuple(cfg.widths), down_block_types=("DownEncoderBlock2D",) * len(cfg.widths),
        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels, scaling_factor=cfg.scale_factor)
    # every tensor live (diffusers' init has mix_factor 0 and a few zero biases)
    vae.load_state_dict(random_tensors({k: v.shape for k, v in vae.state_dict().items()}, seed=3), strict=True)
    vae.eval()
    enc_sd, qc_sd, dec_sd = _split(original_from_diffusers(cfg, vae.state_dict()),
                                   [ENCODER_PREFIX, QUANT_CONV_PREFIX, DECODER_PREFIX])
    ours = types.SimpleNamespace(cfg=cfg, encoder=_load(Encoder(cfg), enc_sd),
                                 quant_conv=_load(make_quant_conv(cfg), qc_sd),
                                 decoder=_load(VideoDecoder(cfg), dec_sd))
    return vae, ours


def test_encode_matches_diffusers(diffusers_pair):
    vae, ours = diffusers_pair
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mode()
        out = encode_condition(ours.encoder, ours.quant_conv, x)
    torch.testing.assert_close(out, ref, atol=DF_TOL, rtol=DF_TOL)


@pytest.mark.parametrize("videos", [1, 2])
def test_decode_matches_diffusers(diffusers_pair, videos):
    vae, ours = diffusers_pair
    t = 5
    z = torch.randn(videos * t, 4, 8, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = vae.decode(z, num_frames=t).sample
        out = ours.decoder(z, t)
    torch.testing.assert_close(out, ref, atol=DF_TOL, rtol=DF_TOL)


@pytest.mark.parametrize("chunk", [2, 5, 14])
def test_decode_latents_matches_diffusers_pipeline(diffusers_pair, chunk):
    """One video: diffusers' flat (b t) chunking and svdlite's per-video chunking coincide."""
    from diffusers import StableVideoDiffusionPipeline as pipeline

    vae, ours = diffusers_pair
    t = 5
    latents = torch.randn(1, t, 4, 8, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = pipeline.decode_latents(types.SimpleNamespace(vae=vae), latents, t, chunk)  # (b, c, t, H, W)
        out = decode_latents(ours.decoder, latents.flatten(0, 1), t, chunk, ours.cfg.scale_factor)
    torch.testing.assert_close(out, ref.permute(0, 2, 1, 3, 4).flatten(0, 1), atol=DF_TOL, rtol=DF_TOL)


# ---------------------------------------------------------------------------------------------- no reference


def test_decode_latents_chunks_each_video_separately():
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    torch.manual_seed(0)
    decoder = VideoDecoder(cfg).eval()
    z = torch.randn(2 * 5, 4, 4, 6)
    with torch.no_grad():
        got = decode_latents(decoder, z * 0.5, 5, 3, 0.5)
        # video 0: frames 0-2, 3-4; video 1: frames 5-7, 8-9 (no chunk straddles the videos)
        want = torch.cat([decoder(z[a:b], b - a) for a, b in ((0, 3), (3, 5), (5, 8), (8, 10))])
    assert rel_err(got, want) < 1e-6
    assert rel_err(got, decoder(z, 5)) > 1e-3  # chunk edges really are zero-padded


def test_full_size_matches_keymap_table():
    """VAEConfig() builds exactly the tensors of SVD's checkpoints, and the table gives diffusers' names and shapes."""
    with open(KEYMAP_TSV, newline="") as f:
        rows = {r["sgm_key"]: r for r in csv.DictReader(f, delimiter="\t")}
    cfg = VAEConfig()
    with torch.device("meta"):
        encoder, quant_conv, decoder = Encoder(cfg), make_quant_conv(cfg), VideoDecoder(cfg)
    ours = {prefix + k: v for prefix, module in ((ENCODER_PREFIX, encoder), (QUANT_CONV_PREFIX, quant_conv),
                                                 (DECODER_PREFIX, decoder))
            for k, v in module.state_dict().items()}
    assert set(ours) == set(rows)
    table = vae_key_map(cfg)
    assert table == {k: r["diffusers_key"] for k, r in rows.items()}
    for key, tensor in ours.items():
        assert list(tensor.shape) == eval(rows[key]["sgm_shape"]), key
        assert list(to_diffusers_shape(key, tensor).shape) == eval(rows[key]["diffusers_shape"]), key
    assert sum(p.numel() for p in decoder.parameters()) == 63_579_183


def test_config_validation_and_errors():
    for bad in ({"ch": 48}, {"ch_mult": ()}, {"video_kernel_size": (2, 1, 1)}, {"scale_factor": 0.0},
                {"num_res_blocks": 0}):
        with pytest.raises(ValueError, match=re.escape(repr(next(iter(bad.values()))))):
            VAEConfig(**bad)
    cfg = VAEConfig(ch=32, ch_mult=(1,), num_res_blocks=1)
    assert VAEConfig.from_dict({**dataclasses.asdict(cfg), "ch_mult": [1], "attn_type": "vanilla"}) == cfg
    with pytest.raises(ValueError, match="num_frames=4"):
        VideoDecoder(cfg)(torch.zeros(6, 4, 2, 2), 4)
    with pytest.raises(ValueError, match="missing"):
        original_from_diffusers(cfg, {})
