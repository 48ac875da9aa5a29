"""Many images to videos: `run_batch` (`svdlite batch`), on one process or many under torchrun.

Inputs are image files, folders (their images, sorted by name) and text files listing paths. Each item's output is
OUTDIR/<input stem>.<format>; an item whose output exists is skipped, so a rerun resumes an interrupted one. The
items still to do are dealt round-robin over the processes (`RANK`/`WORLD_SIZE`, as torchrun sets them): every item
exactly once, decided from the item list and the outputs present at the start, whatever the number of processes.
Each process appends one JSON line per item to its manifest part; at the end rank 0 merges the parts into
OUTDIR/manifest.jsonl, one line per item (its latest record). A failing item is recorded and the run goes on.
Every process needs the same view of OUTDIR (one machine, or a filesystem all machines share).
"""
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .components import SVDModel, load_model
from .image import open_image
from .outputs import exclusive, lock_path
from .pipeline import make_videos
from .run import RUN_KEYS, Run, RunSpec
from .seeds import item_seed, make_generators, random_seed

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
LIST_SUFFIXES = (".txt", ".lst")
VIDEO_FORMATS = ("mp4", "webm", "gif")
MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class Item:
    """One image to turn into a video: its place in the run's item list, its input path and its output path."""

    index: int
    input: Path
    output: Path


def discover_inputs(inputs) -> list[Path]:
    """Image paths, in order: a file as given, a folder's images sorted by name (not recursive), and the lines of a
    .txt/.lst list (blank lines and `#` comments skipped; relative paths are relative to the list's folder).

    Refuses (before any model loads) an input that does not exist, list lines naming missing files (all of them
    are named), and inputs that hold no image at all."""
    paths, missing = [], []
    for given in map(Path, inputs):
        if given.is_dir():
            found = sorted(p for p in given.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"input folder {given} holds no image (files ending in "
                                        f"{', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif given.suffix.lower() in LIST_SUFFIXES and given.is_file():
            listed = []
            for number, line in enumerate(given.read_text().splitlines(), 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    path = Path(line).expanduser()
                    path = path if path.is_absolute() else given.parent / path
                    if path.is_file():
                        listed.append(path)
                    else:
                        missing.append((given, number, path))
            if not listed and not missing:
                raise FileNotFoundError(f"input list {given} names no image (only blank or # lines)")
            paths += listed
        elif given.is_file():
            paths.append(given)
        else:
            raise FileNotFoundError(f"input {given} is not an image file, a folder or a .txt list of paths")
    if missing:
        shown = "; ".join(f"{lst}:{n}: {path}" for lst, n, path in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} listed image(s) not found: {shown}{more}")
    if not paths:
        raise FileNotFoundError("no input images given")
    return paths


def make_items(paths, outdir, video_format: str = "mp4") -> list[Item]:
    """One `Item` per input, its output named after the input's stem; two inputs with one stem are an error."""
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"unknown video format {video_format!r}; expected one of {VIDEO_FORMATS}")
    items, owner = [], {}
    for index, path in enumerate(paths):
        output = Path(outdir) / f"{path.stem}.{video_format}"
        if output.name in owner:
            raise ValueError(f"inputs {owner[output.name]} and {path} would both write {output}; rename one")
        owner[output.name] = path
        items.append(Item(index, Path(path), output))
    return items


def check_outdir(outdir: Path) -> None:
    """Refuse an output folder that is a file, or whose parent folder does not exist (it is made, not its parents)."""
    if outdir.exists() and not outdir.is_dir():
        raise NotADirectoryError(f"output {outdir} is a file; expected a folder (made if missing)")
    if not outdir.parent.is_dir():
        raise FileNotFoundError(f"cannot make output folder {outdir}: {outdir.parent} does not exist")


def shard(items: list, rank: int, world_size: int) -> list:
    """The items of process `rank` out of `world_size`: every world_size-th from rank on (each exactly once)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return items[rank::world_size]


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (torchrun's RANK, WORLD_SIZE, LOCAL_RANK; 0, 1, 0 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env=None) -> "Dist":
        env = os.environ if env is None else env
        try:
            d = cls(*(int(env.get(k, default)) for k, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))))
        except ValueError as err:
            raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {err}") from None
        if d.world_size < 1 or not 0 <= d.rank < d.world_size:
            raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={d.rank}, WORLD_SIZE={d.world_size}")
        return d


def pick_device(device: str, dist: Dist) -> str:
    """"auto": the GPU of this process's local rank when there are GPUs, else the CPU; "cuda": that GPU."""
    if device == "auto":
        return f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"
    return f"cuda:{dist.local_rank}" if device == "cuda" else device


def merge_manifest(outdir: Path, items: list[Item], skipped: list[Item]) -> list[dict]:
    """Merge OUTDIR/manifest.jsonl and every rank's part into manifest.jsonl (written atomically), one record per
    output, the latest one; skipped items without an earlier record get a "skipped" record. Deletes the parts."""
    outdir = Path(outdir)
    records: dict[str, dict] = {}
    parts = sorted(outdir.glob(".manifest.rank*.jsonl"))
    for path in [outdir / MANIFEST] + parts:
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    key = Path(r["output"]).name
                    if key not in records or r.get("finished", "") >= records[key].get("finished", ""):
                        records[key] = r
    for item in skipped:
        records.setdefault(item.output.name, {"input": str(item.input), "output": str(item.output),
                                              "status": "skipped", "error": "output existed before the run"})
    order = [i.output.name for i in items]
    keys = [k for k in order if k in records] + [k for k in records if k not in set(order)]
    tmp = outdir / f".{MANIFEST}.partial"
    tmp.write_text("".join(json.dumps(records[k]) + "\n" for k in keys))
    tmp.replace(outdir / MANIFEST)
    for path in parts:
        path.unlink()
    return [records[k] for k in keys]


def settings_record(run: Run, model: SVDModel, dtype: torch.dtype) -> dict:
    """What every video of the run is made with, as the manifest records it: the settings (the preset's with the
    given ones), the noise schedule, the speed level and the approximate options in force, the model and dtype."""
    options = {k: v for k, v in run.spec.options().items() if k not in ("num_inference_steps", "schedule")}
    f3 = {"f3_schedule": run.spec.record()["f3_schedule"]} if run.spec.f3_schedule is not None else {}
    return (dataclasses.asdict(run.settings) | {"schedule": run.schedule_name, "speed": run.spec.speed} | options | f3
            | {"model": model.source, "dtype": str(dtype).removeprefix("torch.")})


def _init_group(dist: Dist, device: str):
    """(torch.distributed, whether this call initialised it) when there are several processes (gloo on the CPU,
    nccl on GPUs); (None, False) for one. A group the caller initialised is used and left to the caller."""
    if dist.world_size == 1:
        return None, False
    import torch.distributed as td

    if td.is_initialized():
        return td, False
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    # the slowest process may finish long after the others, which then wait at the final barrier
    td.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=dist.rank,
                          world_size=dist.world_size, timeout=datetime.timedelta(hours=24))
    return td, True


@torch.no_grad()
def run_batch(inputs, outdir, *, model="svd-xt", seed: int | None = None, batch_size: int = 1,
              overwrite: bool = False, video_format: str = "mp4", device: str = "auto", dtype="auto",
              progress: bool = True, token: str | None = None, dist: Dist | None = None, lock: bool = True,
              spec: RunSpec | None = None, **options) -> dict:
    """Turn every input image into a video in `outdir`; under torchrun each process does its share.

    Args:
        inputs: image files, folders and .txt lists (`discover_inputs`).
        outdir: the output folder (made if missing); outputs are <input stem>.<video_format>.
        model: an `SVDModel` or anything `load_model` takes; loaded once per process.
        seed: the run's seed; item "name" gets `item_seed(seed, name)`, recorded in the manifest. None: the seed of
            the run recorded in OUTDIR's manifest (a rerun resumes with the same seeds), else a random one (`run_seed`).
        batch_size: videos per UNet evaluation (`generate`'s batch_size).
        overwrite: redo items whose output exists (else they are skipped).
        device: "auto" (GPU of the local rank, else CPU), "cuda" (GPU of the local rank) or a device.
        dtype: the UNet's and CLIP's dtype, as `load_model` takes it ("auto": float16 on a GPU, float32 on the CPU).
        dist: the process's rank and world size; None reads torchrun's environment (`Dist.from_env`).
        lock: hold OUTDIR's lock (`outputs.lock_path`) on rank 0 for the run; False when the caller holds it.
        spec: the settings and options of every video (`RunSpec`), or as keywords in `options`.
        options: `generate`'s sampling and acceleration options (num_frames, num_inference_steps, speed, ...).
    Returns:
        {"done", "failed", "skipped"} counts over all processes, "seconds" (from the start of generation to the end
        of the slowest process), "rank", "world_size" and "records" (this run's manifest records: this process's,
        all processes' on rank 0), "seed" (the run's).
    Raises before any model loads: a missing input or listed image, inputs without images, a bad setting or option,
    an F3 schedule that does not fit, an output folder another run is writing into.
    """
    unknown = set(options) - set(RUN_KEYS)
    if unknown:
        raise TypeError(f"run_batch got unknown options {sorted(unknown)}; expected some of {RUN_KEYS}")
    if spec is not None and options:
        raise ValueError("pass the settings and options either in spec or as keywords, not both")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be an int in [0, 2**64) or None, got {seed!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dist = Dist.from_env() if dist is None else dist
    outdir = Path(outdir)
    # everything that can be checked without the model, before it loads: inputs, settings, options, F3 schedule
    items = make_items(discover_inputs(inputs), outdir, video_format)
    spec = spec or RunSpec.from_options(**options)  # settings and options checked once, before the first item
    spec.check_fit(model)
    check_outdir(outdir)
    with contextlib.ExitStack() as stack:
        if lock and dist.rank == 0:  # one run at a time per output folder (every process of this run is rank 0's)
            stack.enter_context(exclusive(lock_path(outdir), f"output folder {outdir}"))
        outdir.mkdir(exist_ok=True)
        return _run_all(items, outdir, model=model, seed=seed, batch_size=batch_size, overwrite=overwrite,
                        device=pick_device(device, dist), dtype=dtype, progress=progress, token=token, dist=dist,
                        spec=spec)


def _run_all(items: list[Item], outdir: Path, *, model, seed, batch_size, overwrite, device, dtype, progress, token,
             dist: Dist, spec: RunSpec) -> dict:
    group, own_group = _init_group(dist, device)
    try:
        if not isinstance(model, SVDModel):
            model = load_model(model, device=device, dtype=dtype, token=token, progress=progress)
        dtype = next(model.unet.parameters()).dtype
        run = spec.resolve(model)  # the model-aware checks, once for the whole run
        settings = settings_record(run, model, dtype)
        # rank 0 decides what is left to do, the run's seed and its name: every process deals the same list, even if
        # a folder changed between the processes' listings
        shared = [[(i.index, str(i.input), str(i.output)) for i in items if overwrite or not i.output.exists()],
                  datetime.datetime.now().isoformat(), run_seed(outdir, seed) if dist.rank == 0 else None]
        if group is not None:
            group.broadcast_object_list(shared, src=0)
        todo, run_id, seed = [Item(i, Path(a), Path(b)) for i, a, b in shared[0]], shared[1], shared[2][0]
        if dist.rank == 0 and progress:
            print(f"seed: {seed} ({shared[2][1]})", file=sys.stderr)
        skipped = [i for i in items if i not in set(todo)]  # used by rank 0 only
        mine = shard(todo, dist.rank, dist.world_size)
        start = time.perf_counter()
        records: list[dict] = []
        try:
            _run_share(mine, model, outdir / f".manifest.rank{dist.rank}.jsonl", records, seed=seed,
                       batch_size=batch_size, settings=settings, run_id=run_id, overwrite=overwrite, dist=dist,
                       progress=progress, run=run)
        except BaseException as err:
            if isinstance(err, Exception):
                raise
            # Ctrl-C or SIGTERM: say what is on disk and that a rerun resumes (finished videos are skipped)
            done = sum(r["status"] == "done" for r in records)
            raise type(err)(f"{done} of the {len(mine)} video(s) of this process were written to {outdir} before "
                            f"the interruption; run the same command again to make the rest (seed {seed})") from err
        counts = torch.tensor([sum(r["status"] == s for r in records) for s in ("done", "failed")])
        if group is not None:  # sums over the processes (on the GPU for nccl); waits for every share to finish
            counts = counts.to(device if group.get_backend() == "nccl" else "cpu")
            group.all_reduce(counts)
            counts = counts.cpu()
        seconds = time.perf_counter() - start
        if dist.rank == 0:
            records = merge_manifest(outdir, items, skipped)
            records = [r for r in records if r.get("run") == run_id]
        if group is not None:
            group.barrier()  # nobody leaves (and torchrun ends nobody) before the manifest is merged
        return {"done": int(counts[0]), "failed": int(counts[1]), "skipped": len(skipped), "seconds": seconds,
                "rank": dist.rank, "world_size": dist.world_size, "records": records, "seed": seed}
    finally:
        if own_group:
            group.destroy_process_group()


def run_seed(outdir: Path, seed: int | None) -> tuple[int, str]:
    """(the run's seed, where it came from): the given one; else, when OUTDIR has a manifest, the seed of its last
    run (a rerun without --seed resumes with the same item seeds); else a random one."""
    if seed is not None:
        return seed, "given"
    manifest = Path(outdir) / MANIFEST
    if manifest.is_file():
        for line in reversed(manifest.read_text().splitlines()):
            if line.strip() and isinstance(json.loads(line).get("run_seed"), int):
                return json.loads(line)["run_seed"], f"the seed of the run recorded in {manifest}"
    seed = random_seed()
    return seed, f"drawn at random; pass --seed {seed} to make these videos again"


def _run_share(mine: list[Item], model: SVDModel, part: Path, records: list[dict], *, seed, batch_size, settings,
               run_id, overwrite, dist: Dist, progress: bool, run: Run) -> None:
    """Generate this process's items `batch_size` at a time, appending one manifest record per item to `part` and
    to `records`."""
    seeds = {item: item_seed(seed, item.output.stem) for item in mine}  # each item's seed, derived once
    bar = tqdm(total=len(mine), desc=f"rank {dist.rank}/{dist.world_size}" if dist.world_size > 1 else "videos",
               disable=not progress, unit="video")
    with open(part, "a") as log, bar:
        def record(item, status, seconds, error=None, video=None):
            r = {"input": str(item.input), "output": str(item.output), "seed": seeds[item],
                 "run_seed": seed,
                 "status": status, "error": error, "seconds": round(seconds, 3), "batch_size": batch_size,
                 "rank": dist.rank, "world_size": dist.world_size, "settings": settings,
                 "frames_sha256": None if video is None else hashlib.sha256(video.frames.numpy()).hexdigest(),
                 "run": run_id, "finished": datetime.datetime.now().isoformat()}
            log.write(json.dumps(r) + "\n")
            log.flush()
            records.append(r)
            if error is not None:
                print(f"svdlite: {item.input}: failed: {error}", file=sys.stderr)
            bar.update(1)

        def make(chunk, images):
            t0 = time.perf_counter()
            chunk_seeds, generators = make_generators(len(chunk), [seeds[i] for i in chunk], None, True)
            videos = make_videos(model, images, run, chunk_seeds, generators, [None] * len(chunk),
                                 batch_size=len(chunk))
            each = (time.perf_counter() - t0) / len(chunk)
            for item, video in zip(chunk, videos):
                t1 = time.perf_counter()
                try:
                    video.save(item.output, overwrite=overwrite)
                except Exception as err:  # noqa: BLE001 - one item's failure is recorded, the run goes on
                    record(item, "failed", each + time.perf_counter() - t1, _describe(err))
                else:
                    record(item, "done", each + time.perf_counter() - t1, video=video)

        for start in range(0, len(mine), batch_size):
            chunk, images = [], []
            for item in mine[start:start + batch_size]:
                t0 = time.perf_counter()
                try:
                    images.append(open_image(item.input))  # the reader `generate` uses: one policy for images
                    chunk.append(item)
                except Exception as err:  # noqa: BLE001
                    record(item, "failed", time.perf_counter() - t0, _describe(err))
            if not chunk:
                continue
            try:
                make(chunk, images)
            except Exception as err:  # noqa: BLE001
                if len(chunk) == 1:
                    record(chunk[0], "failed", 0.0, _describe(err))
                    continue
                for item, image in zip(chunk, images):  # find the failing item: one at a time
                    try:
                        make([item], [image])
                    except Exception as err:  # noqa: BLE001
                        record(item, "failed", 0.0, _describe(err))


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"
