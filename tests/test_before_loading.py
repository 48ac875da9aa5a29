"""What `generate`, `batch` and `calibrate` refuse before any model loads (exit code 2), and their shared defaults.

Loading is replaced by a function that fails the test, so a refusal that came after loading would show as that
failure, not as exit code 2.
"""
import hashlib
import json
import re

import pytest
import torch
from PIL import Image

from svdlite import cli, errors
from svdlite.batch import MANIFEST, item_seed, run_batch
from svdlite.calibrate import calibrate_f3
from svdlite.components import load_model
from svdlite.f3 import F3Schedule
from svdlite.image import open_image
from svdlite.outputs import exclusive, lock_path
from svdlite.pipeline import generate, make_videos
from svdlite.plan import DEFAULT_CACHE_DEPTH, SPEED_LEVELS

SMALL = ["--model", "tiny", "--num-frames", "3", "--steps", "2", "--height", "64", "--width", "64", "--quiet"]
OPTIONS = dict(num_frames=3, num_inference_steps=2, height=64, width=64)


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("svdlite.components.load_model", refuse)
    monkeypatch.setattr("svdlite.pipeline.load_model", refuse)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype=torch.float32)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in" / "a.png"
    path.parent.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 60)).save(path)
    return path


def schedule_for(tmp_path, tiny, steps: int, frames: int = 3):
    """A real F3 schedule of the tiny model, calibrated for `steps` steps and `frames` frames."""
    path = tmp_path / f"f3_{steps}x{frames}.json"
    img = Image.new("RGB", (64, 64), (10, 120, 200))
    calibrate_f3([img], model=tiny, seed=0, progress=False, num_frames=frames, num_inference_steps=steps,
                 height=64, width=64).save(path)
    return path


def refused(capsys, argv) -> str:
    assert cli.main(argv) == errors.EXIT_REFUSED
    return capsys.readouterr().err


def test_f3_schedule_for_another_step_count_is_refused_before_loading(tmp_path, tiny, image, capsys, monkeypatch):
    path = schedule_for(tmp_path, tiny, steps=3)
    monkeypatch.setattr("svdlite.components.load_model", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr("svdlite.pipeline.load_model", lambda *a, **k: pytest.fail("loaded"))
    for argv in (["generate", str(image), "-o", str(tmp_path / "o.mp4")],
                 ["batch", str(image.parent), "-o", str(tmp_path / "videos")]):
        err = refused(capsys, [*argv, *SMALL, "--f3-schedule", str(path), "--f3-ratio", "0.2"])
        assert "calibrated with num_inference_steps=3, this run uses 2" in err
    err = refused(capsys, ["generate", str(image), "-o", str(tmp_path / "o.mp4"), *SMALL, "--num-frames", "4",
                           "--f3-schedule", str(path), "--steps", "3"])
    assert "calibrated with num_frames=3, this run uses 4" in err
    # the preset's own defaults count when no option is given: tiny's preset runs its own step count
    assert tiny.sampling.num_inference_steps != 3
    err = refused(capsys, ["generate", str(image), "-o", str(tmp_path / "o.mp4"), "--model", "tiny",
                           "--f3-schedule", str(path), "--quiet"])
    assert "calibrated with num_frames=3" in err or "num_inference_steps=3" in err
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "videos").exists()


def test_batch_refuses_bad_options_and_inputs_before_loading(tmp_path, image, capsys, no_loading):
    out = str(tmp_path / "videos")
    err = refused(capsys, ["batch", str(image.parent), "-o", out, *SMALL, "--cache-interval", "2", "--cache-depth",
                           "12"])
    assert "cache_depth must be below 12" in err
    err = refused(capsys, ["batch", str(image.parent), "-o", out, *SMALL, "--f3-schedule", str(tmp_path / "no.json"),
                           "--f3-ratio", "0.1"])
    assert "no.json" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert f"input folder {empty} holds no image" in refused(capsys, ["batch", str(empty), "-o", out, *SMALL])
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two missing, one there\n{image}\nmissing1.png\n\n/nowhere/missing2.jpg\n")
    err = refused(capsys, ["batch", str(listing), "-o", out, *SMALL])
    assert "2 listed image(s) not found" in err and f"{listing}:3: {tmp_path / 'missing1.png'}" in err
    assert f"{listing}:5: /nowhere/missing2.jpg" in err and "Traceback" not in err
    assert not (tmp_path / "videos").exists()


def test_an_output_another_run_is_writing_is_refused(tmp_path, image, capsys, no_loading):
    out = tmp_path / "o.mp4"
    with exclusive(lock_path(out), "x"):
        err = refused(capsys, ["generate", str(image), "-o", str(out), *SMALL])
        assert f"output {out} is being written by another svdlite run" in err
        calib = tmp_path / "f3.json"
        with exclusive(lock_path(calib), "y"):
            err = refused(capsys, ["calibrate", str(image), "-o", str(calib), *SMALL])
            assert "is being written by another svdlite run" in err
    videos = tmp_path / "videos"
    with exclusive(lock_path(videos), "z"):
        err = refused(capsys, ["batch", str(image.parent), "-o", str(videos), *SMALL])
        assert f"output folder {videos} is being written by another svdlite run" in err
    assert not out.exists() and not videos.exists()
    assert not lock_path(out).exists()  # the lock's holder removed it on leaving


def test_lock_is_released_and_reusable(tmp_path):
    target = tmp_path / "v.mp4"
    for _ in range(2):
        with exclusive(lock_path(target), "v"):
            assert lock_path(target).read_text().strip().isdigit()
        assert not lock_path(target).exists()


def test_batch_reads_images_as_generate_does(tmp_path, tiny):
    """A transparent image: batch composites it over white like `generate` (a plain RGB convert shows the colour
    stored under the transparent pixels, black here), so both make the same video from the same seed."""
    folder = tmp_path / "in"
    folder.mkdir()
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((250, 40, 40, 255), (16, 16, 48, 48))
    rgba.save(folder / "clear.png")
    summary = run_batch([folder], tmp_path / "videos", model=tiny, seed=5, progress=False, **OPTIONS)
    (record,) = summary["records"]
    assert record["status"] == "done" and record["seed"] == item_seed(5, "clear")
    direct = generate(open_image(folder / "clear.png"), model=tiny,
                      seed=item_seed(5, "clear"), progress=False, **OPTIONS)
    black = generate(rgba.convert("RGB"), model=tiny, seed=item_seed(5, "clear"), progress=False, **OPTIONS)
    assert record["frames_sha256"] == hashlib.sha256(direct.frames.numpy()).hexdigest()
    assert record["frames_sha256"] != hashlib.sha256(black.frames.numpy()).hexdigest()


def test_batch_refuses_an_image_above_the_size_limit_per_item(tmp_path, tiny, monkeypatch):
    """The image reader's pixel limit applies in batch too: the item fails with the reader's message."""
    monkeypatch.setattr("svdlite.image.MAX_PIXELS", 64 * 64 - 1)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "big.png")
    summary = run_batch([folder], tmp_path / "videos", model=tiny, seed=0, progress=False, **OPTIONS)
    (record,) = summary["records"]
    assert record["status"] == "failed" and "pixels" in record["error"]


def test_ctrl_c_in_batch_says_what_was_written(tmp_path, tiny, capsys, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(5):
        Image.new("RGB", (64, 64), (40 * k, 80, 120)).save(folder / f"{k}.png")
    calls = []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return make_videos(*args, **kwargs)

    monkeypatch.setattr("svdlite.batch.make_videos", interrupting)
    monkeypatch.setattr(cli, "_load", lambda args, device=None, announce=True: tiny)
    code = cli.main(["batch", str(folder), "-o", str(tmp_path / "videos"), *SMALL, "--seed", "3"])
    err = capsys.readouterr().err
    assert code == errors.EXIT_INTERRUPTED
    assert "interrupted; 2 of the 5 video(s) of this process were written to" in err
    assert "run the same command again to make the rest" in err
    assert sorted(p.name for p in (tmp_path / "videos").glob("*.mp4")) == ["0.mp4", "1.mp4"]
    monkeypatch.setattr("svdlite.batch.make_videos", make_videos)
    assert cli.main(["batch", str(folder), "-o", str(tmp_path / "videos"), *SMALL, "--seed", "3"]) == 0
    assert "3 done, 0 failed, 2 skipped" in capsys.readouterr().out


def test_seed_rule_is_one(tmp_path, tiny, image, capsys, monkeypatch):
    """No --seed: generate, calibrate and batch each draw one, print it, and it reproduces the output; batch
    reuses the seed recorded in its folder's manifest on a rerun."""
    monkeypatch.setattr(cli, "_load", lambda args, device=None, announce=True: tiny)
    out = tmp_path / "a.mp4"
    assert cli.main(["generate", str(image), "-o", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    seed = int(re.search(r"seed: (\d+) \(pass --seed \1 ", printed).group(1))
    again = tmp_path / "b.mp4"
    assert cli.main(["generate", str(image), "-o", str(again), *SMALL, "--seed", str(seed)]) == 0
    assert out.read_bytes() == again.read_bytes()

    calib = tmp_path / "f3.json"
    assert cli.main(["calibrate", str(image), "-o", str(calib), *SMALL]) == 0
    seed = int(re.search(r"seed: (\d+) ", capsys.readouterr().out).group(1))
    assert F3Schedule.load(calib).settings["seed"] == seed

    videos = tmp_path / "videos"
    assert cli.main(["batch", str(image.parent), "-o", str(videos), *SMALL]) == 0
    seed = int(re.search(r", seed (\d+);", capsys.readouterr().out).group(1))
    (record,) = [json.loads(line) for line in (videos / MANIFEST).read_text().splitlines()]
    assert record["run_seed"] == seed and record["seed"] == item_seed(seed, "a")
    (videos / "a.mp4").unlink()
    assert cli.main(["batch", str(image.parent), "-o", str(videos), *SMALL]) == 0
    assert f", seed {seed};" in capsys.readouterr().out


def test_cache_interval_alone_takes_the_default_depth(tmp_path, tiny, image):
    assert SPEED_LEVELS["balanced"]["cache_depth"] == DEFAULT_CACHE_DEPTH == 0
    alone = generate(image, model=tiny, seed=1, progress=False, cache_interval=2, **OPTIONS)
    explicit = generate(image, model=tiny, seed=1, progress=False, cache_interval=2, cache_depth=0, **OPTIONS)
    deeper = generate(image, model=tiny, seed=1, progress=False, cache_interval=2, cache_depth=1, **OPTIONS)
    assert torch.equal(alone.latents, explicit.latents) and not torch.equal(alone.latents, deeper.latents)


def test_loading_line_names_dtype_and_threads(tmp_path, image, capsys):
    threads = torch.get_num_threads()
    try:
        assert cli.main(["generate", str(image), "-o", str(tmp_path / "o.mp4"), *SMALL, "--seed", "0",
                         "--device", "cpu", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("loading tiny") and line.endswith("on cpu, float32, 1 CPU thread(s)")
    assert "--threads must be a positive int" in refused(capsys, ["generate", str(image), "-o",
                                                                  str(tmp_path / "p.mp4"), *SMALL, "--threads", "0"])
