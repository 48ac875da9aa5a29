"""Video files: mp4 (H.264), webm (VP9) and gif through PyAV, read back; overwrite and suffix errors."""
import av
import pytest
import torch

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
