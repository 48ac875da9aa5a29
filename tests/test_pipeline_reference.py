"""The whole 5-step sgm sampling run of tests/reference `sample_tiny_io`, with svdlite's UNet, sampler and
temporal decoder on the reference weights: every step's network output, state and denoised estimate, the final
latent and the decoded video.

Tolerance: relative error (max |diff| / max |ref|) below 1e-4, as the reference README suggests for the sampling
run; it measured the float32 noise floor of this run at 2e-6 relative on `samples` (1 vs 2 threads).
"""
import pytest
import torch

from conftest import rel_err
from svdlite import UNetConfig
from svdlite.loading import load_unet
from svdlite.sampling import edm_sigmas, frame_guidance_scales, initial_latents, make_cfg_denoiser, sample_euler_edm
from svdlite.vae import VAEConfig, VideoDecoder, decode_latents
from svdlite.vae_keymap import DECODER_PREFIX

pytestmark = pytest.mark.reference
REL = 1e-4


@pytest.fixture(scope="module")
def run(reference):
    cfg = reference.json("sample_tiny_config.json")
    io = reference.tensors("sample_tiny_io.safetensors")
    unet = load_unet(reference.weights("unet_tiny_sgm.safetensors"),
                     UNetConfig.from_dict(reference.json("unet_tiny_config.json")["params"]))
    t = cfg["guider"]["num_frames"]
    context = torch.cat([io["uc.crossattn"], io["cond.crossattn"]])
    vector = torch.cat([io["uc.vector"], io["cond.vector"]])
    vectors = unet.context_vectors(context, t)  # once per video, before the loop
    trace = {"net_out": []}

    def network(net_in, c_noise):
        out = unet(net_in, c_noise, None, vector, t, io["image_only_indicator"], context_vectors=vectors)
        trace["net_out"].append(out)
        return out

    d = cfg["discretization"]
    sigmas = edm_sigmas(cfg["sampler"]["num_steps"], d["sigma_min"], d["sigma_max"], d["rho"])
    scales = frame_guidance_scales(t, cfg["guider"]["min_scale"], cfg["guider"]["max_scale"])
    denoise = make_cfg_denoiser(network, torch.cat([io["uc.concat"], io["cond.concat"]]), scales)
    steps = []
    with torch.no_grad():
        samples = sample_euler_edm(denoise, initial_latents(io["randn"], sigmas), sigmas,
                                   callback=lambda info: steps.append(info))
        vae_params = reference.json("vae_tiny_config.json")["decoder"]["params"]
        decoder = VideoDecoder(VAEConfig.from_dict(vae_params))
        weights = {k[len(DECODER_PREFIX):]: v for k, v in
                   reference.tensors_at(reference.weights("vae_decoder_tiny_sgm.safetensors")).items()}
        decoder.load_state_dict(weights, strict=True)
        decoded = decode_latents(decoder, samples, t, t, reference.json("vae_tiny_config.json")["scale_factor"])
    return io, cfg, steps, trace["net_out"], samples, decoded


def test_every_step(run):
    io, cfg, steps, net_out, _, _ = run
    assert len(steps) == cfg["sampler"]["num_steps"]
    for k, step in enumerate(steps):
        assert rel_err(step["x"], io[f"step{k}.x"]) < REL, k
        assert rel_err(net_out[k], io[f"step{k}.net_out"]) < REL, k
        assert rel_err(step["denoised"], io[f"step{k}.denoised"]) < REL, k


def test_final_latent_and_decoded_video(run):
    io, _, _, _, samples, decoded = run
    assert rel_err(samples, io["samples"]) < REL
    assert rel_err(decoded, io["decoded"]) < REL
