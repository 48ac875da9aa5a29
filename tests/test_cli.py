"""The `svdlite` command and generate() on the bundled tiny model (random weights: checks mechanics, not quality)."""
import shutil
import subprocess
from pathlib import Path

import av
import pytest
import torch

import svdlite
from svdlite.components import load_model
from svdlite.pipeline import generate
from svdlite.presets import PRESETS

EXAMPLE = Path(svdlite.__file__).parent / "assets" / "example.png"
TINY = PRESETS["tiny"].sampling


def svdlite_cmd(*args, check=True):
    exe = shutil.which("svdlite")
    assert exe, "the `svdlite` console script is not installed (pip install -e .)"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, check=check, timeout=300)


@pytest.mark.parametrize("args", [(), ("generate",), ("info",), ("calibrate",)])
def test_help(args):
    out = svdlite_cmd(*args, "--help").stdout
    assert "usage: svdlite" in out
    if args == ("generate",):
        for option in ("--model", "--seed", "--num-frames", "--steps", "--fps", "--motion-bucket-id",
                       "--noise-aug-strength", "--min-guidance", "--max-guidance", "--decode-chunk-size", "--height",
                       "--width", "--device", "--dtype", "--force", "--guidance-cut-step", "--f3-schedule",
                       "--f3-ratio", "--f3-statistic", "--cache-interval", "--cache-depth", "--speed", "--schedule"):
            assert option in out


def test_calibrate_then_generate_with_f3(tmp_path):
    small = ("--model", "tiny", "--num-frames", 3, "--steps", 2, "--height", 64, "--width", 64, "--no-progress")
    schedule = tmp_path / "f3.json"
    result = svdlite_cmd("calibrate", EXAMPLE, EXAMPLE, "-o", schedule, "--seed", 4, *small)
    assert "16 temporal blocks x 2 steps = 32 units, 2 image(s)" in result.stdout
    saved = svdlite.F3Schedule.load(schedule)
    assert saved.settings["seed"] == 4 and saved.settings["images"] == 2
    assert saved == svdlite.calibrate_f3([EXAMPLE, EXAMPLE], model="tiny", seed=4, num_frames=3, num_inference_steps=2,
                                         height=64, width=64, progress=False)  # the CLI passes its options on
    again = svdlite_cmd("calibrate", EXAMPLE, "-o", schedule, *small, check=False)
    assert again.returncode == 2 and "exists" in again.stderr and "loading" not in again.stdout
    out = tmp_path / "f3.mp4"
    svdlite_cmd("generate", EXAMPLE, "-o", out, "--f3-schedule", schedule, "--f3-ratio", 0.5, "--seed", 1, *small)
    assert out.is_file()
    bad = svdlite_cmd("generate", EXAMPLE, "-o", tmp_path / "x.mp4", "--f3-schedule", schedule, "--f3-ratio", 1.5,
                      *small, check=False)
    assert bad.returncode == 2 and "f3_ratio must be a number in [0, 1)" in bad.stderr and "Traceback" not in bad.stderr
    assert "loading" not in bad.stdout  # refused before the model loads
    other = svdlite_cmd("generate", EXAMPLE, "-o", tmp_path / "x.mp4", "--f3-schedule", schedule, "--f3-ratio", 0.2,
                        *small[:-3], "--steps", 3, check=False)
    assert other.returncode == 2 and "num_inference_steps=2, this run uses 3" in other.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_generate_writes_a_readable_video_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "tiny.mp4"
    result = svdlite_cmd("generate", EXAMPLE, "-o", out, "--model", "tiny", "--seed", 3, "--no-progress")
    assert "6 frames" in result.stdout
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert float(stream.average_rate) == TINY.fps
    assert len(frames) == TINY.num_frames
    assert (frames[0].width, frames[0].height) == (TINY.width, TINY.height)
    again = svdlite_cmd("generate", EXAMPLE, "-o", out, "--model", "tiny", check=False)
    assert again.returncode != 0 and "--force" in again.stderr


def test_info(tmp_path):
    out = svdlite_cmd("info", "tiny").stdout
    assert "format: svdlite" in out and "preset: tiny" in out
    for component in ("unet", "vae_encoder", "vae_decoder", "image_encoder"):
        assert f"{component}:" in out
    bad = svdlite_cmd("info", tmp_path / "missing.safetensors", check=False)
    assert bad.returncode == 2 and "no such file" in bad.stderr  # refused before any work (cli.py)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_same_seed_same_frames(tiny):
    a = generate(EXAMPLE, model=tiny, seed=5, progress=False)
    b = generate(EXAMPLE, model=tiny, seed=5, progress=False)
    c = generate(EXAMPLE, model=tiny, seed=6, progress=False)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)
    assert a.frames.shape == (TINY.num_frames, TINY.height, TINY.width, 3) and a.fps == TINY.fps


def test_explicit_latents_equal_seeded_run(tiny):
    """`latents` is the initial noise at unit variance: drawing it ourselves from the same generator state
    (after the condition-image noise, as diffusers draws) reproduces the seeded run."""
    g = torch.Generator().manual_seed(5)
    torch.randn((1, 3, TINY.height, TINY.width), generator=g)  # the condition image's noise comes first
    noise = torch.randn((TINY.num_frames, 4, TINY.height // 8, TINY.width // 8), generator=g)
    a = generate(EXAMPLE, model=tiny, seed=5, progress=False)
    b = generate(EXAMPLE, model=tiny, generator=torch.Generator().manual_seed(5), latents=noise, progress=False)
    assert torch.equal(a.latents, b.latents)


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="multiple of 64"):
        generate(EXAMPLE, model=tiny, height=100, progress=False)
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        generate(EXAMPLE, model=tiny, num_frames=0, progress=False)
    with pytest.raises(ValueError, match="either seed or generator"):
        generate(EXAMPLE, model=tiny, seed=1, generator=torch.Generator(), progress=False)
    with pytest.raises(ValueError, match="latents must have shape"):
        generate(EXAMPLE, model=tiny, latents=torch.zeros(2, 4, 8, 8), progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        generate(torch.full((3, TINY.height, TINY.width), 2.0), model=tiny, progress=False)
    with pytest.raises(ValueError, match="no such file or folder, and not a preset"):
        load_model("no-such-model")


def test_info_on_a_preset_does_not_download(monkeypatch):
    from svdlite.info import describe

    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: pytest.fail("info downloaded"))
    text = "\n".join(describe("svd-xt-1.1"))
    assert "stabilityai/stable-video-diffusion-img2vid-xt-1-1, gated" in text and "25 frames" in text


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_half_precision_runs_close_to_fp32(dtype, bound):
    """UNet and CLIP in half precision (VAE and sampler stay fp32). Measured on the tiny model: fp16 3.9e-3,
    bf16 3.5e-2 relative L2 of the final latents; bounds at ~5x and ~3x that."""
    a = generate(EXAMPLE, model="tiny", seed=0, progress=False)
    b = generate(EXAMPLE, model="tiny", seed=0, progress=False, dtype=dtype)
    assert torch.isfinite(b.latents).all()
    assert ((a.latents - b.latents).norm() / a.latents.norm()).item() < bound
