"""Model offload (`offload="model"`): each network is moved to the compute device only while it works, in the order
CLIP + VAE encoder, UNet, decoder, and back to CPU memory after; the output equals the plain run's bit for bit.

The machine has no GPU, so the compute device is faked: `torch.device("cpu", 0)` is a device object distinct from
the plain "cpu" the networks return to, and a spy on `nn.Module.to` records every move."""
import pytest
import torch
from torch import nn

from svdlite import checks, cli, load_model
from svdlite.offload import placed
from svdlite.pipeline import generate

SMALL = dict(num_frames=3, num_inference_steps=2, height=64, width=64)
TARGET = torch.device("cpu", 0)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype=torch.float32)


def spy_moves(monkeypatch, model):
    names = {id(getattr(model, n)): n for n in ("unet", "vae_encoder", "vae_decoder", "image_encoder")}
    moves, original = [], nn.Module.to

    def to(self, *args, **kwargs):
        if id(self) in names:
            moves.append((names[id(self)], "target" if args[0] == TARGET else str(args[0])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", to)
    resolve = checks.resolve_device
    monkeypatch.setattr("svdlite.checks.resolve_device", lambda device: TARGET if device == "cuda" else resolve(device))
    return moves


def test_each_network_is_on_the_device_only_while_it_works(tiny, monkeypatch):
    plain = generate("svdlite/assets/example.png", model=tiny, seed=3, progress=False, **SMALL)
    moves = spy_moves(monkeypatch, tiny)
    offloaded = generate("svdlite/assets/example.png", model=tiny, seed=3, progress=False, offload="model",
                         device="cuda", **SMALL)
    assert moves == [("image_encoder", "target"), ("vae_encoder", "target"), ("image_encoder", "cpu"),
                     ("vae_encoder", "cpu"), ("unet", "target"), ("unet", "cpu"), ("vae_decoder", "target"),
                     ("vae_decoder", "cpu")]
    assert torch.equal(plain.latents, offloaded.latents) and torch.equal(plain.frames, offloaded.frames)


def test_networks_go_back_when_the_work_fails(monkeypatch):
    layer = nn.Linear(2, 2)
    moves = []
    original = nn.Module.to
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: (moves.append(str(a[0])), original(self, *a, **k))[1])
    with pytest.raises(RuntimeError, match="boom"), placed([layer], TARGET, True):
        raise RuntimeError("boom")
    assert moves == [str(TARGET), "cpu"]
    with placed([layer], TARGET, False):
        pass
    assert len(moves) == 2  # off: nothing moves


def test_an_unknown_offload_mode_is_refused(tiny):
    with pytest.raises(ValueError, match="offload must be None or 'model'"):
        generate("svdlite/assets/example.png", model=tiny, offload="sequential", **SMALL)


def test_cli_offload_loads_on_the_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("svdlite.checks.resolve_device", lambda device: torch.device("cpu"))
    code = cli.main(["generate", "svdlite/assets/example.png", "-o", str(tmp_path / "o.mp4"), "--model", "tiny",
                     "--num-frames", "3", "--steps", "2", "--height", "64", "--width", "64", "--seed", "1",
                     "--offload", "model", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "on cpu, each network moved to cpu while it works" in out
