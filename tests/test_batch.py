"""`svdlite batch` / `run_batch`: input discovery, sharding, resuming, the manifest, and 2 processes under torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import svdlite
from svdlite.batch import (Dist, Item, discover_inputs, item_seed, make_items, merge_manifest, pick_device,
                           run_batch, shard)
from svdlite.components import load_model

EXAMPLE = Path(svdlite.__file__).parent / "assets" / "example.png"
REPO = Path(__file__).resolve().parents[1]
OPTIONS = dict(num_frames=3, num_inference_steps=2, height=64, width=64)
CLI_OPTIONS = ["--model", "tiny", "--num-frames", "3", "--steps", "2", "--height", "64", "--width", "64"]


def test_discover_inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("b.png", "a.JPG", "c.webp", "notes.md"):
        (folder / name).write_bytes(b"")
    (folder / "sub").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n\nin/c.webp\n{folder / 'b.png'}\n")
    single = tmp_path / "one.png"
    single.write_bytes(b"")
    assert discover_inputs([folder, listing, single]) == [
        folder / "a.JPG", folder / "b.png", folder / "c.webp", tmp_path / "in" / "c.webp", folder / "b.png", single]
    with pytest.raises(FileNotFoundError, match="missing.png is not an image file, a folder or a .txt list"):
        discover_inputs([tmp_path / "missing.png"])


def test_outputs_are_named_after_inputs_and_must_not_collide(tmp_path):
    items = make_items([Path("x/a.png"), Path("y/b.jpg")], tmp_path, "webm")
    assert [i.output for i in items] == [tmp_path / "a.webm", tmp_path / "b.webm"] and items[1].index == 1
    with pytest.raises(ValueError, match="would both write"):
        make_items([Path("x/a.png"), Path("y/a.jpg")], tmp_path)
    with pytest.raises(ValueError, match="unknown video format 'avi'"):
        make_items([Path("x/a.png")], tmp_path, "avi")


@pytest.mark.parametrize("n", [0, 1, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shards_cover_every_item_exactly_once(n, world):
    items = list(range(n))
    shards = [shard(items, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # no padding, no duplicate
    with pytest.raises(ValueError, match="rank must be in"):
        shard(items, world, world)


def test_item_seeds_depend_on_the_seed_and_name_only():
    assert item_seed(0, "a") == item_seed(0, "a") != item_seed(1, "a") != item_seed(0, "b")
    assert 0 <= item_seed(123, "x") < 2**63


def test_dist_from_env_and_device():
    assert Dist.from_env({}) == Dist(0, 1, 0)
    assert Dist.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Dist(3, 4, 1)
    with pytest.raises(ValueError, match="need 0 <= RANK < WORLD_SIZE"):
        Dist.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="must be integers"):
        Dist.from_env({"RANK": "x"})
    assert pick_device("cuda", Dist(3, 4, 1)) == "cuda:1" and pick_device("cpu", Dist(3, 4, 1)) == "cpu"
    assert pick_device("auto", Dist(0, 1, 0)) == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_merge_manifest_keeps_the_latest_record_per_item(tmp_path):
    items = make_items([Path("a.png"), Path("b.png"), Path("c.png")], tmp_path)
    def line(item, status, finished):
        return json.dumps({"output": str(item.output), "status": status, "finished": finished}) + "\n"

    old = Item(9, Path("old.png"), tmp_path / "old.mp4")  # an item of an earlier run, not in this one
    (tmp_path / "manifest.jsonl").write_text(line(items[0], "failed", "2026-01-01") + line(old, "done", "2025"))
    (tmp_path / ".manifest.rank0.jsonl").write_text(line(items[0], "done", "2026-01-02"))
    (tmp_path / ".manifest.rank1.jsonl").write_text(line(items[1], "done", "2026-01-02"))
    records = merge_manifest(tmp_path, items, skipped=[items[1], items[2]])
    assert [(Path(r["output"]).name, r["status"]) for r in records] == [
        ("a.mp4", "done"), ("b.mp4", "done"), ("c.mp4", "skipped"), ("old.mp4", "done")]
    assert not list(tmp_path.glob(".manifest.rank*"))
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Four small distinct images and a corrupt one."""
    folder = tmp_path_factory.mktemp("inputs")
    ex = Image.open(EXAMPLE).convert("RGB").resize((64, 64))
    variants = [ex, ex.transpose(Image.FLIP_LEFT_RIGHT), ex.rotate(90), ex.transpose(Image.FLIP_TOP_BOTTOM)]
    for k, im in enumerate(variants):
        im.save(folder / f"img{k}.png")
    (folder / "corrupt.png").write_bytes(b"this is not a png")
    return folder


def manifest(outdir: Path) -> dict[str, dict]:
    return {Path(r["output"]).name: r for r in map(json.loads, (outdir / "manifest.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def torchrun_run(inputs, tmp_path_factory):
    """`torchrun --nproc-per-node 2 -m svdlite batch` on the CPU (gloo), one thread per process."""
    outdir = tmp_path_factory.mktemp("torchrun") / "out"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                        "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "svdlite",
           "batch", str(inputs), "-o", str(outdir), *CLI_OPTIONS, "--seed", "11", "--no-progress"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return outdir, result


def test_torchrun_two_processes_make_every_item_once(torchrun_run, inputs):
    outdir, result = torchrun_run
    assert result.returncode != 0, "a failed item must make the exit code nonzero"
    assert "4 done, 1 failed, 0 skipped" in result.stdout, result.stdout + result.stderr
    assert sorted(p.name for p in outdir.iterdir()) == ["img0.mp4", "img1.mp4", "img2.mp4", "img3.mp4",
                                                       "manifest.jsonl"]  # no parts or partial files left
    records = manifest(outdir)
    assert sorted(records) == ["corrupt.mp4", "img0.mp4", "img1.mp4", "img2.mp4", "img3.mp4"]
    assert {r["rank"] for r in records.values()} == {0, 1} and {r["world_size"] for r in records.values()} == {2}
    bad = records["corrupt.mp4"]
    assert bad["status"] == "failed" and "corrupt.png is not an image PIL can read" in bad["error"]
    for name, r in records.items():
        assert r["seed"] == item_seed(11, Path(name).stem) and r["settings"]["num_frames"] == 3
        assert r["input"] == str(inputs / name.replace(".mp4", ".png"))


def test_processes_option_reports_a_failed_item_in_one_line(torchrun_run, inputs, tmp_path):
    """`batch --processes 2`: the same shares and videos as torchrun's; a failed item is its own line and one line
    for the processes, exit code 1, no traceback."""
    outdir = tmp_path / "out"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                        "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "svdlite", "batch", str(inputs), "-o", str(outdir), *CLI_OPTIONS, "--seed", "11",
           "--quiet", "--processes", "2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "4 done, 1 failed, 0 skipped" in result.stdout
    ended = [line for line in result.stderr.splitlines() if "ended with exit code" in line]
    assert len(ended) == 1 and "(an item failed: see the manifest)" in ended[0]
    assert len(result.stderr.strip().splitlines()) == 2  # the item's failure line and the process's
    records, reference = manifest(outdir), manifest(torchrun_run[0])
    assert sorted(records) == sorted(reference) and {r["rank"] for r in records.values()} == {0, 1}
    for name, r in records.items():
        assert (r["seed"], r["status"], r["frames_sha256"]) == (reference[name]["seed"], reference[name]["status"],
                                                                reference[name]["frames_sha256"])


def test_single_process_run_equals_torchrun_and_resumes(torchrun_run, inputs, tmp_path):
    """The same items and seeds on one process give the same frames (bit for bit, one thread each); a rerun skips
    every output that exists (the corrupt input, without one, is retried and fails again); after deleting one
    output, a rerun on a different number of processes (1 instead of 2) makes exactly that one."""
    outdir, _ = torchrun_run
    two = manifest(outdir)
    model, threads = load_model("tiny"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def run(out):
            return run_batch([inputs], out, model=model, seed=11, progress=False, dist=Dist(), **OPTIONS)

        single = run(tmp_path / "single")
        one = manifest(tmp_path / "single")
        assert (single["done"], single["failed"]) == (4, 1)
        for name in two:
            assert one[name]["seed"] == two[name]["seed"] and one[name]["status"] == two[name]["status"]
            assert one[name]["frames_sha256"] == two[name]["frames_sha256"], name

        mtimes = {p.name: p.stat().st_mtime_ns for p in outdir.glob("*.mp4")}
        again = run(outdir)
        assert (again["done"], again["failed"], again["skipped"]) == (0, 1, 4)
        assert {p.name: p.stat().st_mtime_ns for p in outdir.glob("*.mp4")} == mtimes
        assert manifest(outdir)["img1.mp4"] == two["img1.mp4"]  # the skipped item keeps its record

        (outdir / "img2.mp4").unlink()
        third = run(outdir)
        assert (third["done"], third["failed"], third["skipped"]) == (1, 1, 3)
        assert [Path(r["output"]).name for r in third["records"] if r["status"] == "done"] == ["img2.mp4"]
        assert {p.name: p.stat().st_mtime_ns for p in outdir.glob("*.mp4") if p.name != "img2.mp4"} == {
            k: v for k, v in mtimes.items() if k != "img2.mp4"}
        redone = manifest(outdir)["img2.mp4"]
        assert redone["world_size"] == 1 and redone["frames_sha256"] == two["img2.mp4"]["frames_sha256"]
    finally:
        torch.set_num_threads(threads)


def test_batch_size_reaches_the_unet(inputs, tmp_path):
    """--batch-size 2 runs two videos per UNet evaluation; the corrupt image is left out of its batch."""
    model = load_model("tiny")
    rows = []
    handle = model.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        summary = run_batch([inputs], tmp_path, model=model, seed=0, batch_size=2, progress=False, dist=Dist(),
                            **OPTIONS)
    finally:
        handle.remove()
    assert (summary["done"], summary["failed"]) == (4, 1)
    # items in order corrupt, img0..img3: batches [img0] (corrupt dropped), [img1, img2], [img3]; 2 steps each
    assert rows == [2 * 3] * 2 + [2 * 2 * 3] * 2 + [2 * 3] * 2
    assert {r["batch_size"] for r in summary["records"]} == {2}


def test_cli_batch_options_and_errors(tmp_path):
    from svdlite.cli import main

    with pytest.raises(SystemExit):
        main(["batch", "--help"])
    # refused before any work (exit codes: svdlite.errors)
    assert main(["batch", str(tmp_path / "nothing"), "-o", str(tmp_path / "out"), *CLI_OPTIONS]) == 2
    with pytest.raises(TypeError, match="unknown options"):
        run_batch([], tmp_path, model="tiny", colour="red")
