"""The `*_image_decoder` checkpoints (svd_image_decoder.safetensors, svd_xt_image_decoder.safetensors): the same
UNet and conditioner, but a plain 2-D SD decoder (`first_stage_model.decoder.*` without temporal layers, plus
`first_stage_model.post_quant_conv`) that decodes every frame on its own. Tiny synthetic files, no downloads."""
import torch
from safetensors import safe_open

from svdlite.components import load_model
from svdlite.info import describe
from svdlite.pipeline import generate
from svdlite.testing import random_tensors
from svdlite.vae import FrameDecoder, VideoDecoder
from test_convert import VAE, run, write_original

FRAME_KEYS = {"first_stage_model." + k: tuple(v.shape) for k, v in FrameDecoder(VAE).state_dict().items()}


def image_decoder_variant(tensors: dict) -> None:
    """Turn an original file's tensors into the *_image_decoder layout: 2-D decoder, post_quant_conv, quant_conv."""
    for key in [k for k in tensors if k.startswith("first_stage_model.decoder.")]:
        del tensors[key]
    tensors.update(random_tensors(FRAME_KEYS, seed=5))
    tensors["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 1, 1)  # in the file, never used


def test_loads_as_a_per_frame_decoder(tmp_path):
    src = tmp_path / "svd_xt_image_decoder.safetensors"
    tensors = write_original(src, edit=image_decoder_variant)
    model = load_model(src)
    assert isinstance(model.vae_decoder, FrameDecoder) and model.preset == "svd-xt"
    for key, value in model.vae_decoder.state_dict().items():
        assert torch.equal(value, tensors["first_stage_model." + key]), key
    assert any("2-D decoder, run on each frame alone" in line for line in describe(src))
    video = generate(torch.rand(3, 64, 64), model=model, num_frames=3, num_inference_steps=1, height=64, width=64,
                     seed=0, progress=False)
    assert video.frames.shape == (3, 64, 64, 3)


def test_equals_the_temporal_decoder_with_its_temporal_layers_switched_off(tmp_path):
    """VideoDecoder with every blend weight sigmoid(mix_factor) = 0 and an identity time_mix_conv is the 2-D
    decoder: an independent check of the 2-D decoder's structure and order, frame by frame."""
    frame = FrameDecoder(VAE)
    frame.load_state_dict(random_tensors({k: tuple(v.shape) for k, v in frame.state_dict().items()}, seed=3))
    video = VideoDecoder(VAE)
    state = {k: v.clone() for k, v in video.state_dict().items()}
    for key, value in frame.decoder.state_dict().items():
        state[key] = value
    for key in state:
        if key.endswith("mix_factor"):
            state[key] = torch.full_like(state[key], -torch.inf)
    kernel = torch.zeros_like(state["conv_out.time_mix_conv.weight"])
    kernel[:, :, kernel.shape[2] // 2] = torch.eye(kernel.shape[0])[:, :, None, None]
    state["conv_out.time_mix_conv.weight"], state["conv_out.time_mix_conv.bias"] = kernel, torch.zeros(kernel.shape[0])
    video.load_state_dict(state)
    z = torch.randn(4, VAE.z_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, reference = frame(z, 4), video(frame.post_quant_conv(z), 4)
        one_by_one = torch.cat([frame(z[i:i + 1], 1) for i in range(4)])
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, one_by_one, rtol=1e-5, atol=1e-5)  # no frame sees another


def test_converts_and_reloads(tmp_path):
    src = tmp_path / "svd_image_decoder.safetensors"
    write_original(src, edit=image_decoder_variant)
    out = tmp_path / "converted.safetensors"
    assert run(src, out, "--dtype", "fp32") == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["vae_decoder"] == "frame" and "vae_decoder.post_quant_conv.weight" in f.keys()
    a, b = load_model(src), load_model(out)
    assert isinstance(b.vae_decoder, FrameDecoder)
    z = torch.randn(2, VAE.z_channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(a.vae_decoder(z, 2), b.vae_decoder(z, 2))
