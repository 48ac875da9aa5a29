"""Checking that a file is a complete safetensors file before it is opened, from its first bytes and its header.

svdlite reads safetensors only and never unpickles anything: a pickle checkpoint (`.ckpt`, `.pt`, `.pth`, `.bin`,
torch.save's zip or a raw pickle) can run code when loaded. The safetensors layout: 8 bytes little-endian header
length N, N bytes of JSON {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the tensor data;
`data_offsets` are relative to the end of the header, so a complete file is 8 + N + the largest end offset long.
"""
import json
import math
from pathlib import Path

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
OTHER_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
CONVERT_ADVICE = ("svdlite reads .safetensors only and never unpickles a file (unpickling can run code); convert it "
                  "once, if you trust it: torch.load(path, weights_only=True), then safetensors.torch.save_file, or "
                  "use the official .safetensors release")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: wrong format, missing/unexpected/misshapen tensors, unreadable file."""


EXPECTED = "expected an original SVD .safetensors file, a diffusers folder or an svdlite converted file"
REDOWNLOAD = "download or copy it again"
# file kinds recognised from their first bytes, for the message that refuses them
SIGNATURES = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"GIF87a", "a GIF image"),
              (b"GIF89a", "a GIF image"), (b"BM", "a BMP image"), (b"II*\x00", "a TIFF image"),
              (b"MM\x00*", "a TIFF image"), (b"\x1aE\xdf\xa3", "a WebM/Matroska video"),
              (b"\x1f\x8b", "a gzip archive"), (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
              (b"GGUF", "a GGUF file (quantised weights for llama.cpp / ComfyUI-GGUF), which svdlite does not read"),
              (b"\x89HDF", "an HDF5 file (Keras weights?)"), (b"\x7fELF", "a program (ELF executable)"),
              (b"%PDF", "a PDF document"))
LFS_POINTER = b"version https://git-lfs"


def looks_like(head: bytes) -> str:
    """What a file that is not safetensors seems to be, from its first bytes (up to 64 of them), for a message."""
    if head.startswith(LFS_POINTER):
        return ("a Git LFS pointer, a small text file standing for the weights: the repository was cloned without "
                "git-lfs; run `git lfs pull` in it, or download the file itself")
    for magic, kind in SIGNATURES:
        if head.startswith(magic):
            return f"{kind}, first bytes {head[:8].hex(' ')}"
    if head[:4] == b"RIFF" and head[8:12] in (b"WEBP", b"AVI ", b"WAVE"):
        return {b"WEBP": "a WebP image", b"AVI ": "an AVI video", b"WAVE": "a WAV sound"}[head[8:12]] + \
            f", first bytes {head[:8].hex(' ')}"
    if head[4:8] == b"ftyp":
        return f"an MP4/MOV video, first bytes {head[:8].hex(' ')}"
    text = None
    for cut in range(4):  # text whose last multi-byte character `head` cuts in two is still text
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    if text is not None and text.strip() and all(c.isprintable() or c in "\t\r\n" for c in text):
        start = " ".join(text.split())[:40].rstrip()
        if text.lstrip().lower().startswith(("<!doctype html", "<html")):
            return (f"an HTML page, starting {start!r}: a web page (a login or error page?) saved in place of the "
                    "file; download the file itself")
        if text.lstrip().startswith(("{", "[")):
            return f"a JSON or other text file, starting {start!r}"
        return f"a text file, starting {start!r}"
    return ""


def read_header(path) -> tuple[dict, int]:
    """(header, first data byte) of a safetensors file; CheckpointError unless it is complete and well formed.

    The one place svdlite parses a safetensors header. A file that is not safetensors at all (an image, a text
    file, a web page, a pickle) is refused with what it looks like; an empty, truncated or corrupt one with what
    is wrong with it."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] == b"PK\x03\x04":
            raise CheckpointError(f"{path} is a PyTorch zip/pickle checkpoint (torch.save), not safetensors; "
                                  + CONVERT_ADVICE)
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            raise CheckpointError(f"{path} is a pickle file, not safetensors; " + CONVERT_ADVICE)
        if size == 0:
            raise CheckpointError(f"{path} is empty (0 bytes), not a safetensors checkpoint (an incomplete download "
                                  f"or copy?); {EXPECTED}")
        length = int.from_bytes(head[:8], "little")
        kind = looks_like(head)
        truncated_header = 8 + length > size and head[8:9] in (b"{", b"")  # a header's JSON starts with {
        if size < 8 or length > MAX_HEADER_BYTES or length < 2 or (8 + length > size and not truncated_header):
            if size < 8:
                why = f"{size} bytes long, too short for the 8-byte header length"
            else:
                why = (f"its first 8 bytes, {head[:8].hex(' ')}, read as a header length give {length:,} bytes"
                       + (f", more than the file's {size:,}" if 8 + length > size else ""))
            hint = (f"; {CONVERT_ADVICE}" if path.suffix.lower() in PICKLE_SUFFIXES and not kind
                    else "; for a diffusers model, pass its folder" if path.suffix.lower() == ".json" else "")
            raise CheckpointError(f"{path} is not a safetensors checkpoint ({kind or why}); {EXPECTED}{hint}")
        if 8 + length > size:
            raise CheckpointError(f"{path} is truncated: its header needs {8 + length:,} bytes, the file has "
                                  f"{size:,} (incomplete download or copy?); {REDOWNLOAD}")
        f.seek(8)
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path} has a corrupt safetensors header (not valid JSON: {err}); "
                              f"{REDOWNLOAD}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (a JSON {type(header).__name__}, "
                              f"expected an object); {REDOWNLOAD}")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path} has a corrupt safetensors header: __metadata__ is not a table of strings "
                              f"({str(metadata)[:80]})")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = max(end, _check_entry(path, name, info))
    if 8 + length + end > size:
        raise CheckpointError(f"{path} is truncated: its tensors end at byte {8 + length + end:,}, the file has "
                              f"{size:,} bytes (incomplete download or copy?); {REDOWNLOAD}")
    return header, 8 + length


def check_safetensors_file(path) -> dict:
    """Raise CheckpointError unless `path` is a complete, well-formed safetensors file; returns its header."""
    return read_header(path)[0]


def _check_entry(path: Path, name: str, info) -> int:
    """One tensor's header entry: known dtype, a shape, offsets that match dtype x shape; returns its end offset."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{path} has a corrupt safetensors header: entry {name!r} lacks dtype, shape or "
                              "data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    itemsize = FLOAT_DTYPES.get(dtype, OTHER_DTYPES.get(dtype))
    valid_shape = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
    valid_offsets = (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                     and 0 <= offsets[0] <= offsets[1])
    if itemsize is None or not valid_shape or not valid_offsets:
        raise CheckpointError(f"{path} has a corrupt safetensors header: tensor {name!r} has dtype {dtype!r}, "
                              f"shape {shape!r}, data_offsets {offsets!r}")
    if offsets[1] - offsets[0] != itemsize * math.prod(shape):
        raise CheckpointError(f"{path} has a corrupt safetensors header: tensor {name!r} ({dtype} {shape}) "
                              f"would take {itemsize * math.prod(shape):,} bytes, its offsets give "
                              f"{offsets[1] - offsets[0]:,}")
    return offsets[1]
