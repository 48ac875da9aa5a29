"""Everyday failures on the bundled tiny model: reproducible files, clean exits (Ctrl-C, SIGTERM, --debug), no
partial files, non-finite values stopped, a loaded model's dtype and device used, diffusers-shaped latents."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import svdlite
from svdlite import cli, errors
from svdlite.components import load_model
from svdlite.pipeline import generate
from svdlite.presets import PRESETS
from svdlite.video import Video

EXAMPLE = Path(svdlite.__file__).parent / "assets" / "example.png"
TINY_FILE = Path(svdlite.__file__).parent / "assets" / "tiny.safetensors"
TINY = PRESETS["tiny"].sampling
SHORT = dict(num_frames=2, num_inference_steps=1)  # where only the mechanics matter


def svdlite_process(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "svdlite", *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_same_seed_gives_the_same_file_in_separate_processes(tmp_path):
    """The issue's case: identical frames used to give different mp4 bytes from run to run (video.py docstring)."""
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    for out in (a, b):
        result = svdlite_process("generate", EXAMPLE, "-o", out, "--model", "tiny", "--seed", 7, "--no-progress")
        assert result.returncode == 0, result.stderr
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".gif"])
def test_saving_the_same_frames_gives_the_same_bytes(tmp_path, suffix):
    """Noise-like frames, as the tiny model makes: x264 with mbtree and webm's random segment id both changed the
    bytes between two saves in one process."""
    frames = torch.randint(0, 256, (6, 128, 192, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    blobs = {Video(frames, fps=7).save(tmp_path / f"v{i}{suffix}").read_bytes() for i in range(4)}
    assert len(blobs) == 1


def test_mp4_carries_the_reproducible_encoder_settings(tmp_path):
    """x264's output with mbtree varied between runs only some of the time (it depends on the process), so beside
    the end-to-end tests above this checks deterministically that the settings reach the file: x264 records its
    options in the stream, and a bitexact container has no library version tag."""
    import re

    data = Video(torch.zeros(3, 64, 64, 3, dtype=torch.uint8), fps=7).save(tmp_path / "v.mp4").read_bytes()
    options = re.search(rb"x264 - core .*? options: ([^\x00]*)", data).group(1).split()
    assert b"mbtree=0" in options and b"Lavf" not in data


def test_exit_codes_traceback_only_with_debug(tmp_path):
    bad = svdlite_process("generate", EXAMPLE, "-o", tmp_path / "x.mp4", "--model", "tiny", "--fps", "0")
    assert bad.returncode == 2 and bad.stderr.startswith("svdlite: error: fps") and "Traceback" not in bad.stderr
    debug = svdlite_process("generate", EXAMPLE, "-o", tmp_path / "x.mp4", "--model", "tiny", "--fps", "0", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    usage = svdlite_process("generate", EXAMPLE)
    assert usage.returncode == 2 and "required: -o/--output" in usage.stderr
    version = svdlite_process("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"svdlite {svdlite.__version__}"


def test_sigterm_during_sampling_exits_cleanly_and_writes_nothing(tmp_path):
    out = tmp_path / "out.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "svdlite", "generate", str(EXAMPLE), "-o", str(out), "--model",
                             "tiny", "--steps", "200", "--seed", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stdout:  # the model is loaded once this line is printed
            if line.startswith("loading"):
                break
        time.sleep(2.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == errors.EXIT_TERMINATED, err
    assert "terminated; nothing was written" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_inside_a_finalizer_is_sent_again_after_it(monkeypatch):
    """A SIGTERM handled while the garbage collector runs a `__del__` would raise where Python drops exceptions
    (seen: regex's Group.__del__ during sampling, the run then went on and wrote its file); the handler sends it
    again instead, and raises Terminated anywhere else."""
    sent = []
    monkeypatch.setattr(errors.os, "kill", lambda pid, signum: sent.append((pid, signum)))

    class Finalized:
        def __del__(self):
            errors._raise_terminated(signal.SIGTERM, sys._getframe())

    Finalized()  # its __del__ runs here, and must not raise
    deadline = time.monotonic() + 10
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent == [(os.getpid(), signal.SIGTERM)]
    with pytest.raises(errors.Terminated):
        errors._raise_terminated(signal.SIGTERM, sys._getframe())


def test_sigterm_while_writing_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    frames = torch.zeros(4, 64, 64, 3, dtype=torch.uint8)
    original = av.VideoFrame.from_ndarray
    calls = []

    def from_ndarray(*args, **kwargs):  # the third frame arrives with a SIGTERM
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", from_ndarray)
    (tmp_path / "keep.mp4").write_bytes(b"precious")
    code = errors.run_cleanly(lambda args: Video(frames, fps=7).save(tmp_path / "keep.mp4", overwrite=True), None)
    assert code == errors.EXIT_TERMINATED and len(calls) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"] and (tmp_path / "keep.mp4").read_bytes() == b"precious"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is only installed while running


def test_ctrl_c_is_one_line(capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    assert errors.run_cleanly(interrupted, None) == errors.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "svdlite: interrupted; nothing was written"


def test_unexpected_failure_is_one_line_with_exit_code_1(capsys):
    def broken(args):
        raise KeyError("boom")

    assert errors.run_cleanly(broken, None) == errors.EXIT_FAILED
    assert capsys.readouterr().err == "svdlite: error: KeyError: 'boom' (run with --debug for the traceback)\n"


def _tiny_with(tmp_path, key: str, value: float) -> Path:
    with safe_open(str(TINY_FILE), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[key] = torch.full_like(tensors[key], value)
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def test_nan_weights_stop_with_where_and_what_to_do(tmp_path, capsys):
    path = _tiny_with(tmp_path, "unet.out.2.bias", float("nan"))
    out = tmp_path / "out.mp4"
    code = cli.main(["generate", str(EXAMPLE), "-o", str(out), "--model", str(path), "--seed", "0", "--no-progress",
                     "--num-frames", "2", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == errors.EXIT_FAILED and "the latents after sampling hold" in err and "--dtype fp32" in err
    assert not out.exists()


def test_nan_in_the_decoder_is_named(tmp_path):
    model = load_model(_tiny_with(tmp_path, "vae_decoder.conv_out.bias", float("inf")))
    with pytest.raises(FloatingPointError, match="the decoded frames hold .* VAE decoder"):
        generate(EXAMPLE, model=model, seed=0, progress=False, **SHORT)


def test_nan_in_the_image_encoder_is_named(tmp_path):
    model = load_model(_tiny_with(tmp_path, "image_encoder.proj", float("nan")))
    with pytest.raises(FloatingPointError, match="CLIP embedding and VAE latent of the image hold"):
        generate(EXAMPLE, model=model, seed=0, progress=False, **SHORT)


def test_readme_example_a_float16_model_with_the_default_dtype():
    """load_model(..., dtype=float16) then generate(model=...) without dtype: runs in the model's dtype."""
    model = load_model("tiny", dtype=torch.float16)
    video = generate(EXAMPLE, model=model, seed=0, progress=False, **SHORT)
    reference = generate(EXAMPLE, model="tiny", seed=0, progress=False, dtype=torch.float16, **SHORT)
    assert torch.equal(video.latents, reference.latents)
    with pytest.raises(ValueError, match=r"the model's UNet is torch.float16, not dtype=torch.float32"):
        generate(EXAMPLE, model=model, dtype=torch.float32, progress=False)
    from svdlite.checks import model_device_dtype

    with pytest.raises(ValueError, match="the model is on meta, not on device='cpu'"):  # no second device here
        model_device_dtype(torch.nn.Linear(1, 1, device="meta"), "cpu")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_diffusers_shaped_latents(tiny):
    noise = torch.randn((2, 4, TINY.height // 8, TINY.width // 8), generator=torch.Generator().manual_seed(2))
    a = generate(EXAMPLE, model=tiny, seed=3, latents=noise, progress=False, **SHORT)
    b = generate(EXAMPLE, model=tiny, seed=3, latents=noise[None], progress=False, **SHORT)  # (batch, frames, 4, h, w)
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 4, 16, 24\) or \(1, 2, 4, 16, 24\)"):
        generate(EXAMPLE, model=tiny, latents=torch.cat([noise[None]] * 2), progress=False, **SHORT)
    with pytest.raises(ValueError, match="finite"):
        generate(EXAMPLE, model=tiny, latents=noise * float("nan"), progress=False, **SHORT)


@pytest.mark.parametrize("kwargs,message", [
    (dict(noise_aug_strength=float("nan")), "noise_aug_strength must be a finite number"),
    (dict(min_guidance_scale=float("nan")), "min_guidance_scale must be a finite number"),
    (dict(max_guidance_scale=0.5), "min_guidance_scale=1.0 is above max_guidance_scale=0.5"),  # with the preset's min
    (dict(fps=0), "fps must be a positive int"),
    (dict(fps=7.5), "fps must be a positive int"),
    (dict(motion_bucket_id=float("inf")), "motion_bucket_id must be a finite number"),
    (dict(num_frames=True), "num_frames must be a positive int"),
    (dict(seed=2**64), r"seed must be an int in \[0, 2\*\*64\)"),
    (dict(seed=-5), r"seed must be an int in \[0, 2\*\*64\)"),
    (dict(guidance_cut_step=5), r"guidance_cut_step must be in \[0, 4\]"),  # tiny: 4 steps
    (dict(height=96), "height must be a positive multiple of 64, got 96"),
    (dict(dtype=torch.float64), "dtype must be one of"),
    (dict(device="cuda:0"), "'cuda:0' asked"),
])
def test_settings_refused_before_sampling(kwargs, message, monkeypatch):
    monkeypatch.setattr("svdlite.pipeline.make_denoiser", lambda *a, **k: pytest.fail("sampling started"))
    monkeypatch.setattr("svdlite.conditioning.encode_image", lambda *a, **k: pytest.fail("the image was encoded"))
    with pytest.raises(ValueError, match=message):
        generate(EXAMPLE, model="tiny", progress=False, **kwargs)


def test_a_bad_image_fails_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr("svdlite.pipeline.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "x.png").write_bytes(b"GIF89a nonsense")
    with pytest.raises(ValueError, match="x.png is corrupt or truncated|x.png is not an image"):
        generate(tmp_path / "x.png", model="tiny", progress=False)


def test_unwritable_output_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """As root every folder is writable, so the permission answer is simulated."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    monkeypatch.setattr("svdlite.components.load_component", lambda *a, **k: pytest.fail("model loaded"))
    code = cli.main(["generate", str(EXAMPLE), "-o", str(tmp_path / "x.mp4"), "--model", "tiny"])
    assert code == errors.EXIT_REFUSED and f"folder {tmp_path} is not writable" in capsys.readouterr().err


def test_diffusers_folder_with_pickle_weights_says_so(tmp_path):
    from svdlite.formats import open_model_source

    (tmp_path / "unet").mkdir()
    save_file({"conv_in.weight": torch.zeros(1), "down_blocks.0.temporal_x": torch.zeros(1)},
              str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"vae/diffusion_pytorch_model.bin are pickle files, which svdlite never"):
        open_model_source(tmp_path)


def test_sigterm_during_conversion_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    """The issue's 4.4 GB `.partial` file: the temporary file is removed when SIGTERM arrives while it is written."""
    import svdlite.convert
    from test_convert import convert_weights, write_original

    src = tmp_path / "svd.safetensors"
    write_original(src)
    real_save = svdlite.convert.save_aligned

    def save_then_sigterm(tensors, path, metadata):
        real_save(tensors, path, metadata)
        assert Path(path).stat().st_size > 0  # a temporary file exists now
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(svdlite.convert, "save_aligned", save_then_sigterm)
    out = tmp_path / "out" / "converted.safetensors"
    assert convert_weights.main([str(src), str(out)]) == errors.EXIT_TERMINATED
    assert "terminated; nothing was written" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


def test_seed_and_model_lines_are_printed(tmp_path, capsys):
    """Without --seed the drawn seed is printed (to make a good run again), then what is loaded, from where; a model
    path that does not exist is refused before either."""
    code = cli.main(["generate", str(EXAMPLE), "-o", str(tmp_path / "x.mp4"), "--model", str(tmp_path / "m.bin")])
    out = capsys.readouterr()
    assert code == errors.EXIT_REFUSED and "no such file or folder" in out.err and out.out == ""
    code = cli.main(["generate", str(EXAMPLE), "-o", str(tmp_path / "x.mp4"), "--model", "tiny", "--num-frames", "2",
                     "--steps", "1", "--height", "64", "--width", "64", "--device", "cpu", "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    seed = int(out.out.split("seed: ")[1].split()[0])
    assert 0 <= seed < 2**32 and f"pass --seed {seed} to make this again" in out.out
    assert "loading tiny (bundled, " in out.out and "on cpu, float32, " in out.out


def test_clean_errors_from_a_thread_too(capsys):
    """SIGTERM handling is for the main thread only; from another thread errors are still one clean line."""
    import threading

    codes = []
    worker = threading.Thread(target=lambda: codes.append(cli.main(["info", "/nonexistent/svd.safetensors"])))
    worker.start()
    worker.join()
    assert codes == [errors.EXIT_REFUSED] and "no such file" in capsys.readouterr().err


def test_info_says_whether_a_file_is_complete(tmp_path):
    from svdlite.info import describe

    assert describe("tiny")[-1].startswith("complete: yes")
    with safe_open(str(TINY_FILE), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("image_encoder.")}
        meta = {**f.metadata(), "components": "unet,vae_encoder,vae_decoder"}
    save_file(tensors, str(tmp_path / "noclip.safetensors"), metadata=meta)
    lines = describe(tmp_path / "noclip.safetensors")
    assert any(line.startswith("image_encoder: 32 of the 32 tensors svdlite reads are absent") for line in lines)
    assert lines[-1] == "complete: no, image_encoder missing; generation needs all four components"
