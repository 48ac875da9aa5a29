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


def check_safetensors_file(path) -> dict:
    """Raise CheckpointError unless `path` is a complete, well-formed safetensors file; returns its header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] == b"PK\x03\x04":
            raise CheckpointError(f"{path} is a PyTorch zip/pickle checkpoint (torch.save), not safetensors; "
                                      + CONVERT_ADVICE)
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            raise CheckpointError(f"{path} is a pickle file, not safetensors; " + CONVERT_ADVICE)
        if size < 8:
            raise CheckpointError(f"{path} is {size} bytes long, too short for a safetensors file"
                                      + (" (empty: incomplete download?)" if size == 0 else ""))
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER_BYTES or length < 2:
            hint = f"; {CONVERT_ADVICE}" if path.suffix.lower() in PICKLE_SUFFIXES else ""
            raise CheckpointError(f"{path} is not a safetensors file (its first 8 bytes give a header length of "
                                      f"{length:,} bytes){hint}")
        if 8 + length > size:
            raise CheckpointError(f"{path} is truncated: its header needs {8 + length:,} bytes, the file has "
                                      f"{size:,} (incomplete download or copy?)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} has a corrupt safetensors header (not valid JSON: {err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (a JSON {type(header).__name__}, "
                                  "expected an object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = max(end, _check_entry(path, name, info))
    if 8 + length + end > size:
        raise CheckpointError(f"{path} is truncated: its tensors end at byte {8 + length + end:,}, the file has "
                                  f"{size:,} bytes (incomplete download or copy?)")
    return header


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
