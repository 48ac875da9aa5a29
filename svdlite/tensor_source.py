"""Reading (and writing) the tensors of safetensors files: lazy, selective, straight into the final dtype.

Only the tensors a model needs are read; every read is recorded in `TensorSource.reads`. Each tensor is read once,
straight into its final dtype and device: a tensor already in that dtype is the file's own memory map (no copy),
any other is converted piecewise from a read-only memory map into a new tensor of the final dtype, each piece's
pages dropped from the process once converted, so the file never counts towards the process's memory and the
model is never held twice (peak = the loaded model + one piece). The header itself is parsed and checked once,
by checkpoint_file.read_header.
"""
import json
import mmap
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint_file import EXPECTED, CheckpointError, read_header

# safetensors dtype names -> torch dtypes (the format's header, https://github.com/huggingface/safetensors)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
READ_BUFFER_BYTES = 32 << 20  # converted reads go piecewise: at most this much of a file is mapped at once
# svdlite writes its files with every tensor at this alignment (that of torch's own allocations). Tensors of other
# files are used in place from the memory map at whatever alignment they have (safetensors guarantees only the
# element's): copying them would cost a second checkpoint's worth of fresh memory. The values are the same; the
# outputs agree to float32 rounding, not always to the bit (some CPU kernels round differently on differently
# aligned weights: a 1x1 convolution at one thread, 1.3e-6; tests/test_loading.py).
ALIGNMENT = 64


class TensorSource:
    """Lazy access to the tensors of one or more safetensors files (several for a sharded diffusers folder)."""

    def __init__(self, files: list[Path]):
        self.files, self.key_file, self.metadata, self.reads, self._handles = files, {}, {}, [], {}
        self._layout: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # key -> (dtype, shape, offset, end)
        self._maps: dict[Path, mmap.mmap] = {}  # read-only maps for converted reads (`_read_converted`)
        self._private: dict[Path, torch.Tensor] = {}  # each file as bytes over a private map (`_file_bytes`)
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: no such file")
            header, base = read_header(f)  # not safetensors, truncated, corrupt: named before safe_open
            self._layout.update(_layout(header, base))
            try:
                h = self._handles[f] = safe_open(str(f), framework="pt")
                self.metadata.update(h.metadata() or {})
                self.key_file.update({k: f for k in h.keys()})
            except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as err:
                raise CheckpointError(f"{f} is not a readable safetensors file ({err}); {EXPECTED}") from err

    def keys(self) -> set[str]:
        return set(self.key_file)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._layout[key][1]

    def nbytes(self, key: str) -> int:
        """The tensor's size in the file, in bytes."""
        _, _, start, end = self._layout[key]
        return end - start

    def dtype(self, key: str) -> str:
        """The stored dtype, as safetensors names it (F32, F16, BF16, I64, ...)."""
        return self._layout[key][0]

    def get(self, key: str, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        """Read one tensor (recorded in `reads`) as `dtype` (default: the file's) on `device`.

        In the file's dtype on the CPU it is the file's memory map (no copy; a private map: writing to it copies
        the pages written, never the file); otherwise it is converted once, in pieces of READ_BUFFER_BYTES, into a
        new tensor of `dtype` on `device`."""
        self.reads.append(key)
        file = self.key_file[key]
        name, shape, start, end = self._layout[key]
        stored = SAFETENSORS_DTYPES.get(name)
        try:
            if stored is None:
                return self._handles[file].get_tensor(key).to(device=device, dtype=dtype)
            dtype = stored if dtype is None else dtype
            if dtype == stored and torch.device(device).type == "cpu":
                if start % stored.itemsize:  # not at its element's alignment in the file: safetensors copies it
                    return self._handles[file].get_tensor(key)
                data = self._file_bytes(file)
                if end > data.numel():
                    raise CheckpointError(f"{file}: file ends inside tensor {key!r}; truncated file?")
                return data[start:end].view(stored).view(shape)
            out = torch.empty(shape, dtype=dtype, device=device)
            self._read_converted(file, stored, start, end, out.view(-1))
            return out
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{file}: cannot read tensor {key!r} ({err}); truncated file?") from err

    def _file_bytes(self, file: Path) -> torch.Tensor:
        """The whole file as a uint8 tensor over a private (copy-on-write) memory map, made once per file: a tensor
        in the file's dtype is a view of it (3-4x faster than safetensors' `get_tensor`, which builds a storage
        slice per tensor: 0.026 s of a 0.08 s UNet load). Writing to such a tensor copies the page, never the file."""
        data = self._private.get(file)
        if data is None:
            with open(file, "rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            data = self._private[file] = torch.frombuffer(mapped, dtype=torch.uint8)
        return data

    def _read_converted(self, file: Path, stored: torch.dtype, start: int, end: int, out: torch.Tensor) -> None:
        """Bytes [start, end) of `file` (elements of `stored`) into the flat tensor `out`, converting piecewise.

        Each piece of READ_BUFFER_BYTES is converted straight from a read-only memory map of the file (the page
        cache, no intermediate copy), and its pages are then dropped from this process's mapping
        (MADV_DONTNEED: the page cache keeps them), so no more than one piece of the file is ever resident here."""
        if end - start != out.numel() * stored.itemsize:
            raise CheckpointError(f"{file}: a tensor's byte range {start}..{end} does not match its shape")
        if end > file.stat().st_size:
            raise CheckpointError(f"{file}: file ends inside a tensor; truncated file?")
        mapped = self._maps.get(file)
        if mapped is None:
            with open(file, "rb") as fh:
                mapped = self._maps[file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        step = max(1, READ_BUFFER_BYTES // stored.itemsize)
        with warnings.catch_warnings():  # read only, never written: torch warns about any non-writable buffer
            warnings.simplefilter("ignore", UserWarning)
            for i in range(0, out.numel(), step):
                n = min(step, out.numel() - i)
                offset = start + i * stored.itemsize
                out[i:i + n].copy_(torch.frombuffer(mapped, dtype=stored, count=n, offset=offset))
                if hasattr(mapped, "madvise"):  # POSIX; elsewhere the pages stay mapped until the map closes
                    first = offset - offset % mmap.PAGESIZE
                    mapped.madvise(mmap.MADV_DONTNEED, first, offset + n * stored.itemsize - first)

    def release_buffer(self) -> None:
        """Unmap the files' read-only maps used for converted reads (the next converted read maps them again)."""
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()


def _layout(header: dict, base: int) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """{key: (dtype name, shape, first byte, end byte)} from a checked safetensors header (`read_header`) whose
    data starts at byte `base`."""
    return {k: (v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def save_aligned(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file (u64 header length, JSON header, data) with its data 64-byte aligned: the header
    padded with spaces (as the format allows) to a multiple of 64 bytes, tensors of 64-multiple size first."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    order = sorted(tensors, key=lambda k: (tensors[k].nbytes % ALIGNMENT != 0, k))
    header, offset = {"__metadata__": metadata}, 0
    for key in order:
        t = tensors[key]
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for key in order:
            fh.write(memoryview(tensors[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
