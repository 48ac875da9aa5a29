"""The generated video: uint8 frames plus fps, written as mp4 (H.264), webm (VP9) or gif through PyAV.

Files are reproducible: the same frames give the same bytes. Two things made them differ from run to run:
x264's macroblock-tree rate control (`mbtree`), whose output changed between encodes of identical input on an
AVX-512 CPU (with one thread as with several, in some processes more than others; x264 limited to AVX2, or
without mbtree, was stable: README "Reproducible files"), and the matroska muxer's random segment UID in webm
files. So mbtree is off, x264's thread count is fixed (its output depends on it) and the container is written
`bitexact` (no random ids, no library version string).
"""
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

# suffix -> (codec, pixel format)
CODECS = {".mp4": ("libx264", "yuv420p"), ".webm": ("libvpx-vp9", "yuv420p"), ".gif": ("gif", "rgb8")}
# encoder options: quality, and what makes the bytes reproducible (module docstring)
CODEC_OPTIONS = {"libx264": {"crf": "17", "threads": "4", "x264-params": "mbtree=0"}, "libvpx-vp9": {}, "gif": {}}
CONTAINER_OPTIONS = {"fflags": "+bitexact"}


def check_output(path, *, overwrite: bool = False) -> Path:
    """Refuse an output path that cannot be written, before any work: unknown suffix, an existing file (unless
    `overwrite`), a folder, a missing or unwritable folder. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a folder; expected a file name such as {path / 'video.mp4'}")
    if path.suffix.lower() not in CODECS:
        raise ValueError(f"cannot write {path}: unknown video suffix {path.suffix!r}; expected one of "
                         f"{', '.join(sorted(CODECS))}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --force) to replace it")
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: folder {folder} is not writable")
    return path


def to_uint8_frames(decoded: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) in [-1, 1] -> (T, H, W, 3) uint8, as sgm: clamp((x + 1) / 2, 0, 1) * 255, rounded."""
    x = ((decoded.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


@dataclass
class Video:
    """frames: (T, H, W, 3) uint8 tensor on the CPU; fps: playback rate; latents: the final denoised latents;
    seed: the seed it was generated with (None when a generator was passed)."""

    frames: torch.Tensor
    fps: float
    latents: torch.Tensor | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.frames.dtype != torch.uint8 or self.frames.ndim != 4 or self.frames.shape[-1] != 3:
            raise ValueError(f"Video.frames must be (T, H, W, 3) uint8, got {tuple(self.frames.shape)} "
                             f"{self.frames.dtype}")
        if not self.fps > 0:
            raise ValueError(f"Video.fps must be positive, got {self.fps}")

    def __len__(self) -> int:
        return self.frames.shape[0]

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    @property
    def width(self) -> int:
        return self.frames.shape[2]

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write to `path`; the suffix picks the format (.mp4, .webm, .gif). Refuses to overwrite unless asked.

        The file is written beside the target under a temporary name and renamed when complete."""
        import av  # the only module that needs PyAV

        path = check_output(path, overwrite=overwrite)
        codec, pix_fmt = CODECS[path.suffix.lower()]
        if pix_fmt == "yuv420p" and (self.height % 2 or self.width % 2):
            raise ValueError(f"{codec} needs an even frame size, got {self.width}x{self.height}")
        tmp = path.with_name(f".{path.name}.partial")
        try:
            with av.open(str(tmp), mode="w", format=path.suffix.lower().lstrip("."),
                         options=CONTAINER_OPTIONS) as container:
                stream = container.add_stream(codec, rate=Fraction(self.fps).limit_denominator(1000))
                stream.width, stream.height, stream.pix_fmt = self.width, self.height, pix_fmt
                stream.options = dict(CODEC_OPTIONS[codec])
                for index, frame in enumerate(self.frames.numpy()):
                    picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                    picture.pts = index  # in units of 1/fps, the stream's rate
                    for packet in stream.encode(picture):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
