"""`run_batch`: an item's seed and video do not depend on the other inputs, and the manifest's seed makes the same
video with `svdlite generate` (the CLI, in-process). Tiny model, 3 frames, 2 steps, 64x64, one CPU thread."""
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import svdlite
from svdlite.batch import Dist, run_batch
from svdlite.cli import main
from svdlite.components import load_model

EXAMPLE = Path(svdlite.__file__).parent / "assets" / "example.png"
SETTINGS = {"num_frames": 3, "num_inference_steps": 2, "height": 64, "width": 64}
CLI_SETTINGS = ["--model", "tiny", "--num-frames", "3", "--steps", "2", "--height", "64", "--width", "64",
                "--device", "cpu", "--dtype", "fp32", "--threads", "1", "--quiet"]
SEED = 2024


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the frames depend on the thread count in the last bits
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """The same two images batched alone, then with a third input that sorts before them ("0first.png")."""
    root = tmp_path_factory.mktemp("independence")
    example = Image.open(EXAMPLE).convert("RGB").resize((64, 64))
    images = {"b.png": example, "c.png": example.transpose(Image.FLIP_LEFT_RIGHT),
              "0first.png": example.rotate(90)}
    two, three = root / "two", root / "three"
    two.mkdir()
    three.mkdir()
    for name, image in images.items():
        image.save(three / name)
        if name != "0first.png":
            image.save(two / name)
    assert (two / "b.png").read_bytes() == (three / "b.png").read_bytes()
    model = load_model("tiny", device="cpu", dtype=torch.float32)
    result = {}
    for folder in (two, three):
        out = root / f"out_{folder.name}"
        summary = run_batch([folder], out, model=model, seed=SEED, progress=False, dist=Dist(), device="cpu",
                            **SETTINGS)
        assert (summary["done"], summary["failed"]) == (len(list(folder.iterdir())), 0)
        result[folder.name] = (out, {Path(r["output"]).name: r for r in map(
            json.loads, (out / "manifest.jsonl").read_text().splitlines())})
    return root, result


def decoded_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_seed_and_frames_do_not_depend_on_the_other_inputs(runs):
    _, result = runs
    (out_two, two), (out_three, three) = result["two"], result["three"]
    assert sorted(two) == ["b.mp4", "c.mp4"] and sorted(three) == ["0first.mp4", "b.mp4", "c.mp4"]
    # the added input sorts first: every other item's place in the list moved by one
    first = json.loads((out_three / "manifest.jsonl").read_text().splitlines()[0])
    assert Path(first["output"]).name == "0first.mp4"
    for name in ("b.mp4", "c.mp4"):
        assert two[name]["status"] == three[name]["status"] == "done"
        assert three[name]["seed"] == two[name]["seed"], name
        assert three[name]["frames_sha256"] == two[name]["frames_sha256"], name
        assert (out_three / name).read_bytes() == (out_two / name).read_bytes(), name
    # distinct items get distinct seeds and videos (the comparison above is not vacuous)
    assert two["b.mp4"]["seed"] != two["c.mp4"]["seed"]
    assert len({r["frames_sha256"] for r in three.values()}) == 3


@pytest.mark.parametrize("name", ["b", "c"])
def test_manifest_seed_reproduces_the_video_with_generate(runs, name, tmp_path):
    """`svdlite generate IMAGE --seed <manifest seed>` with the run's settings writes the same file, byte for byte
    (svdlite's files are reproducible), and the same frames, whose sha256 is the manifest's frames_sha256."""
    import hashlib

    root, result = runs
    out_dir, records = result["three"]
    record = records[f"{name}.mp4"]
    assert record["settings"]["num_frames"] == 3 and record["settings"]["num_inference_steps"] == 2
    out = tmp_path / f"{name}.mp4"
    code = main(["generate", str(root / "three" / f"{name}.png"), "-o", str(out), "--seed", str(record["seed"]),
                 *CLI_SETTINGS])
    assert code == 0
    batch_file = out_dir / f"{name}.mp4"
    got, expected = decoded_frames(out), decoded_frames(batch_file)
    assert got.shape == (3, 64, 64, 3) and np.array_equal(got, expected)
    assert out.read_bytes() == batch_file.read_bytes()
    # the manifest's frames_sha256 is the hash of the frames generate makes with that seed (before encoding)
    video = svdlite.generate(root / "three" / f"{name}.png", model=load_model("tiny", device="cpu",
                                                                             dtype=torch.float32),
                             seed=record["seed"], progress=False, **SETTINGS)
    assert hashlib.sha256(video.frames.numpy()).hexdigest() == record["frames_sha256"]
