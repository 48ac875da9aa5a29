"""Seeded, time-bounded fuzzing of the image loader and the checkpoint reader: mutated files (flipped, overwritten,
inserted and cut bytes) must give a correct result or a clean error (ValueError naming the file), never another
exception, a hang (each case has an alarm) or an unbounded allocation (images are size-checked before decoding)."""
import io
import random
import signal
import struct
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import svdlite
from svdlite.formats import open_model_source
from svdlite.image import MAX_PIXELS, open_image
from svdlite.checkpoint_file import CheckpointError
from svdlite.tensor_source import TensorSource

SECONDS = 3.0  # per fuzz test
CASE_ALARM = 10  # seconds; a case that takes longer counts as a hang
TINY_FILE = Path(svdlite.__file__).parent / "assets" / "tiny.safetensors"


@contextmanager
def alarm(seconds: int):
    def hang(signum, frame):
        raise TimeoutError(f"a case ran for more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def mutate(data: bytes, rng: random.Random, hot: int) -> bytes:
    """One to four edits, most of them in the first `hot` bytes (headers), some anywhere."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        end = hot if rng.random() < 0.8 else len(data)
        at = rng.randrange(max(1, min(end, len(data))))
        kind = rng.choice(("flip", "byte", "word", "insert", "cut", "truncate"))
        if kind == "flip" and data:
            data[at] ^= 1 << rng.randrange(8)
        elif kind == "byte" and data:
            data[at] = rng.randrange(256)
        elif kind == "word":
            data[at:at + 4] = struct.pack("<I", rng.choice((0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, rng.getrandbits(32))))
        elif kind == "insert":
            data[at:at] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 16)))
        elif kind == "cut":
            del data[at:at + rng.randint(1, 64)]
        else:
            del data[at:]
    return bytes(data)


def image_seeds() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    out = []
    for fmt, img, kwargs in (("png", rgb, {}), ("png", rgb.convert("RGBA"), {}), ("jpeg", rgb, {"quality": 90}),
                             ("gif", rgb.convert("P"), {"save_all": True, "append_images": [rgb.convert("P")]}),
                             ("webp", rgb, {}), ("tiff", rgb, {}), ("bmp", rgb, {}),
                             ("png", Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)), {})):
        buffer = io.BytesIO()
        img.save(buffer, format=fmt, **kwargs)
        out.append((fmt, buffer.getvalue()))
    return out


def test_fuzz_image_loader(tmp_path):
    rng, seeds, deadline = random.Random(1234), image_seeds(), time.monotonic() + SECONDS
    outcomes = {"loaded": 0, "refused": 0}
    path = tmp_path / "fuzz.img"
    case = 0
    while time.monotonic() < deadline:
        fmt, data = seeds[case % len(seeds)]
        path.write_bytes(mutate(data, rng, hot=64))
        with alarm(CASE_ALARM):
            try:
                img = open_image(path)
            except ValueError as err:
                assert str(path) in str(err), err
                outcomes["refused"] += 1
            else:
                assert img.mode == "RGB" and img.width * img.height <= MAX_PIXELS
                outcomes["loaded"] += 1
        case += 1
    assert case >= 50 and outcomes["loaded"] and outcomes["refused"], outcomes


def small_checkpoint() -> bytes:
    tensors = {"model.diffusion_model.a.weight": torch.ones(3, 2), "b": torch.zeros(4, dtype=torch.float16),
               "c": torch.arange(5, dtype=torch.float32)}
    path = Path(__import__("tempfile").mkdtemp()) / "s.safetensors"
    save_file(tensors, str(path), metadata={"format": "x"})
    return path.read_bytes()


def test_fuzz_checkpoint_reader(tmp_path):
    rng, deadline = random.Random(99), time.monotonic() + SECONDS
    small = small_checkpoint()
    header_len = 8 + struct.unpack("<Q", small[:8])[0]
    outcomes = {"read": 0, "refused": 0}
    path = tmp_path / "fuzz.safetensors"
    case = 0
    while time.monotonic() < deadline:
        path.write_bytes(mutate(small, rng, hot=header_len))
        with alarm(CASE_ALARM):
            try:
                src = TensorSource([path])
                tensors = {k: src.get(k) for k in sorted(src.keys())}
            except CheckpointError as err:
                assert str(path) in str(err), err
                outcomes["refused"] += 1
            else:
                assert all(t.numel() == np.prod(src.shape(k)) for k, t in tensors.items())
                outcomes["read"] += 1
        case += 1
    assert case >= 50 and outcomes["refused"], outcomes


def test_fuzz_model_header(tmp_path):
    """The bundled tiny model with its (large) header mutated: detection and configs fail cleanly or succeed."""
    rng, deadline = random.Random(7), time.monotonic() + SECONDS
    data = TINY_FILE.read_bytes()
    header_len = 8 + struct.unpack("<Q", data[:8])[0]
    path = tmp_path / "tiny_fuzz.safetensors"
    case = 0
    while time.monotonic() < deadline:
        path.write_bytes(mutate(data[:header_len], rng, hot=header_len) + data[header_len:])
        with alarm(CASE_ALARM):
            try:
                open_model_source(path)
            except (CheckpointError, ValueError) as err:  # ValueError: a config in the metadata out of range
                assert "Traceback" not in str(err)
        case += 1
    assert case >= 20
