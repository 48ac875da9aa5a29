"""Video files: mp4 (H.264), webm (VP9) and gif through PyAV, read back; overwrite and suffix errors."""
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from svdlite.video import Video, to_uint8_frames


@pytest.mark.parametrize("suffix,codec", [(".mp4", "h264"), (".webm", "vp9"), (".gif", "gif")])
def test_save_and_read_back(tmp_path, suffix, codec):
    frames = torch.randint(0, 256, (5, 32, 48, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path = Video(frames, fps=7).save(tmp_path / f"v{suffix}")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        assert stream.codec_context.name == codec
    assert len(decoded) == 5 and (decoded[0].width, decoded[0].height) == (48, 32)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_lossless_enough_mp4(tmp_path):
    """A smooth gradient survives H.264 at crf 17 within a few levels."""
    ramp = torch.linspace(0, 255, 48).round().to(torch.uint8)
    frames = ramp[None, None, :, None].expand(3, 32, 48, 3).contiguous()
    path = Video(frames, fps=8).save(tmp_path / "g.mp4")
    with av.open(str(path)) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert abs(torch.from_numpy(first).int() - frames[0].int()).max() <= 6


def test_errors(tmp_path):
    video = Video(torch.zeros(2, 32, 48, 3, dtype=torch.uint8), fps=7)
    (tmp_path / "x.mp4").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="overwrite"):
        video.save(tmp_path / "x.mp4")
    assert (tmp_path / "x.mp4").read_bytes() == b"keep"
    video.save(tmp_path / "x.mp4", overwrite=True)
    with pytest.raises(ValueError, match="unknown video suffix '.avi'"):
        video.save(tmp_path / "x.avi")
    with pytest.raises(ValueError, match="uint8"):
        Video(torch.zeros(2, 32, 48, 3), fps=7)
    with pytest.raises(ValueError, match="even frame size"):
        Video(torch.zeros(2, 31, 48, 3, dtype=torch.uint8), fps=7).save(tmp_path / "odd.mp4")


def test_to_uint8_frames():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8_frames(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


# Known frames read back from the file: count, order, orientation, size and rate, per format.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (255, 255, 0), (255, 0, 255),
           (0, 255, 255)]
MARK = (slice(0, 16), slice(0, 24))  # top-left block: the colour of frame (k + 4) % 8, so a flip or transpose shows


def known_frames(count: int, height: int, width: int) -> torch.Tensor:
    """Frame k: COLOURS[k] everywhere but the top-left MARK block, which is COLOURS[(k + 4) % 8]."""
    palette = torch.tensor(COLOURS, dtype=torch.uint8)
    frames = palette[:count, None, None, :].expand(count, height, width, 3).clone()
    frames[:, MARK[0], MARK[1]] = palette[[(k + 4) % len(COLOURS) for k in range(count)], None, None, :]
    return frames


def closest_colour(pixels: np.ndarray) -> int:
    mean = pixels.reshape(-1, 3).astype(np.float64).mean(axis=0)
    return int(np.argmin([np.sum((mean - np.array(c)) ** 2) for c in COLOURS]))


@pytest.mark.parametrize("fps", [7, 12.5])
@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".gif"])
def test_known_frames_read_back(tmp_path, suffix, fps):
    """Eight frames of distinct colours, 80x48: PyAV decodes eight 80x48 frames, frame k's mean colour (away from
    the block's edges, where chroma subsampling blurs) is closest to colour k and its top-left block's to colour
    k + 4, and frame k is shown at k / fps (within the container's clock tick)."""
    count, height, width = 8, 48, 80
    path = Video(known_frames(count, height, width), fps=fps).save(tmp_path / f"v{suffix}")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (width, height)
        decoded = list(container.decode(stream))
        tick = stream.time_base
        rate = stream.average_rate
    assert len(decoded) == count
    assert all((f.width, f.height) == (width, height) for f in decoded)
    for k, frame in enumerate(decoded):
        rgb = frame.to_ndarray(format="rgb24")
        assert rgb.shape == (height, width, 3)
        assert closest_colour(rgb[24:, 32:]) == k, f"frame {k} has the colour of frame {closest_colour(rgb[24:, 32:])}"
        assert closest_colour(rgb[2:14, 2:22]) == (k + 4) % len(COLOURS), f"frame {k}: top-left block"
        assert abs(frame.pts * tick - Fraction(k) / Fraction(fps)) <= tick, (k, frame.pts, tick)
    if suffix == ".gif":
        # gif stores a delay per frame in hundredths of a second: each within one of 100 / fps, the total exact
        # to a hundredth
        delays = [f.duration * tick * 100 for f in decoded]
        assert all(abs(d - Fraction(100) / Fraction(fps)) <= 1 for d in delays), delays
        assert abs(sum(delays) - Fraction(100 * count) / Fraction(fps)) <= 1
        with Image.open(path) as img:  # and PIL, reading the file on its own, sees the same frames and delays
            assert (img.n_frames, img.size) == (count, (width, height))
            ms = []
            for k in range(count):
                img.seek(k)
                ms.append(img.info["duration"])
                assert closest_colour(np.asarray(img.convert("RGB"))[24:, 32:]) == k
            assert abs(sum(ms) - 1000 * count / fps) <= 10 and all(abs(m - 1000 / fps) <= 10 for m in ms), ms
    else:
        assert rate == Fraction(fps), rate
