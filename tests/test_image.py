"""The conditioning image: PIL modes, transparency, EXIF orientation, animations, sizes, tensors (svdlite/image.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

from svdlite import image as image_mod
from svdlite.image import check_image_tensor, load_image, open_image, resize_cover, to_rgb


def rgb_of(img) -> tuple:
    return to_rgb(img).getpixel((0, 0))


@pytest.mark.parametrize("make,expected", [
    (lambda: Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (255, 255, 255)),  # fully transparent: white
    (lambda: Image.new("RGBA", (4, 4), (10, 20, 30, 255)), (10, 20, 30)),  # opaque: unchanged
    (lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127)),  # half: blended over white
    (lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
    (lambda: Image.new("L", (4, 4), 77), (77, 77, 77)),
    (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
    (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    (lambda: Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255)),  # 16-bit gray (I;16)
    (lambda: Image.fromarray(np.full((4, 4), 32896, np.uint16)), (128, 128, 128)),  # not clipped to white
    (lambda: Image.fromarray(np.full((4, 4), 4000, np.int32)), (16, 16, 16)),  # mode I: read as 0..65535
    (lambda: Image.fromarray(np.full((4, 4), 0.5, np.float32)), (128, 128, 128)),  # mode F: [0, 1]
])
def test_modes(make, expected):
    assert rgb_of(make()) == expected


def test_palette_with_transparency_over_white():
    img = Image.new("P", (4, 4), 3)
    img.putpalette([0, 0, 0] * 3 + [200, 10, 10] + [0, 0, 0] * 252)
    assert rgb_of(img) == (200, 10, 10)
    img.info["transparency"] = 3
    assert rgb_of(img) == (255, 255, 255)


def test_out_of_range_float_and_16_bit_values_are_refused():
    with pytest.raises(ValueError, match=r"mode 'F' values must lie in \[0, 1\], got \[2, 2\]"):
        to_rgb(Image.fromarray(np.full((2, 2), 2.0, np.float32)), name="x.tiff")
    with pytest.raises(ValueError, match=r"mode 'I' values must lie in \[0, 65535\], got \[-3, -3\]"):
        to_rgb(Image.fromarray(np.full((2, 2), -3, np.int32)), name="x.png")


def test_16_bit_png_file_keeps_its_levels(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(path)
    assert open_image(path).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6: stored sideways, displayed turned 90 degrees clockwise (a portrait phone photo)."""
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    upright = open_image(path)
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[2] > 200 and top[0] < 60 and bottom[0] > 200 and bottom[2] < 60  # stored left is now on top


def test_animated_image_gives_its_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with Image.open(path) as img:
        assert img.n_frames == 2
    assert open_image(path).getpixel((0, 0)) == (255, 0, 0)


def test_resize_is_lanczos_cover_and_centre_crop():
    """Against PIL's own Lanczos of the same cover size; another filter gives other pixels."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    got = np.asarray(resize_cover(img, 64, 64))
    size = (round(70 * 64 / 50), 64)  # height fills, width overhangs by 26 -> crop 13 each side
    left = (size[0] - 64) // 2
    expected = np.asarray(img.resize(size, Image.LANCZOS).crop((left, 0, left + 64, 64)))
    bicubic = np.asarray(img.resize(size, Image.BICUBIC).crop((left, 0, left + 64, 64)))
    assert got.shape == (64, 64, 3) and np.array_equal(got, expected) and not np.array_equal(got, bicubic)


@pytest.mark.parametrize("size", [(1, 1), (3000, 1), (1, 3000), (4096, 4096)])
def test_any_size_is_resized_without_a_huge_copy(size, monkeypatch):
    requested = []
    original = Image.Image.resize

    def resize(self, new_size, *args, **kwargs):
        requested.append(new_size)
        return original(self, new_size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", resize)
    out = resize_cover(Image.new("RGB", size, (9, 99, 199)), 576, 1024)
    assert out.size == (1024, 576) and out.getpixel((512, 288)) == (9, 99, 199)
    assert max(w * h for w, h in requested) <= 4 * 576 * 1024


def test_load_image_from_pil_and_path_agree(tmp_path):
    img = Image.new("RGBA", (70, 50), (0, 200, 0, 0))
    img.save(tmp_path / "t.png")
    a, b = load_image(img, 64, 64), load_image(tmp_path / "t.png", 64, 64)
    assert torch.equal(a, b) and a.shape == (1, 3, 64, 64) and torch.all(a == 1.0)  # transparent -> white


@pytest.mark.parametrize("tensor,message", [
    (torch.zeros(3, 64, 64, dtype=torch.uint8), "floating point .* divide a uint8 image by 255"),
    (torch.zeros(64, 64, 3), r"got \(64, 64, 3\); channels come first"),
    (torch.zeros(2, 3, 64, 64), r"got \(2, 3, 64, 64\)"),
    (torch.full((3, 64, 64), float("nan")), "NaN or infinite"),
    (torch.full((3, 64, 64), -0.5), r"must lie in \[0, 1\]"),
    (torch.zeros(3, 32, 64), r"expected \(height, width\) = \(64, 64\)"),
])
def test_bad_tensors(tensor, message):
    with pytest.raises(ValueError, match=message):
        check_image_tensor(tensor, 64, 64)


def test_max_pixels_is_checked_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(image_mod, "MAX_PIXELS", 100)
    Image.new("RGB", (11, 10)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(ValueError, match="is 11x10 pixels; svdlite reads images of at most 100 pixels"):
        open_image(tmp_path / "big.png")
