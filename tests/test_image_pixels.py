"""Every pixel of the conditioning image (`load_image`, `resize_cover`) against a computation written out here.

svdlite documents two ways of covering height x width (image.py `resize_cover`):
- when the image scaled to cover the output has at most 4x the output's pixels: the whole image is scaled by
  s = max(W_out / W, H_out / H) to (round(W s), round(H s)) (at least the output size) with Lanczos, then the
  centre is cut out at the integer offset floor(overhang / 2) (the plain resize-then-crop);
- otherwise only the kept region is resampled: exactly PIL's `ImageOps.fit(img, size, LANCZOS, centering=(0.5,
  0.5))`, which resamples the centred box of the source (a fractional box) straight to the output size.
The references below are written from that description, with exact rational arithmetic for the sizes and offsets
and PIL's Lanczos (`Image.resize`) or `ImageOps.fit` for the resampling, so every comparison is exact (the same PIL
resampling of the same region gives the same bytes; no tolerance). Where the two ways coincide (the cover size
is exact and the overhang even: the same sample positions), svdlite's result must equal `ImageOps.fit` too.
Images are gradients plus noise, so a crop one pixel off, a swapped axis or another filter shows in the pixels.
"""
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from svdlite.image import load_image, resize_cover


def ramps_and_noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """R: horizontal ramp, G: vertical ramp, B: noise."""
    y, x = np.mgrid[0:height, 0:width]
    red = (x * 255 // max(width - 1, 1)).astype(np.uint8)
    green = (y * 255 // max(height - 1, 1)).astype(np.uint8)
    blue = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    return Image.fromarray(np.stack([red, green, blue], axis=-1))


def nearest(value: Fraction) -> int:
    """Round to the nearest integer, halves to even (Python's rule), on the exact value."""
    return round(value)


def reference(img: Image.Image, out_w: int, out_h: int) -> np.ndarray:
    """The documented cover-and-centre-crop, written out (module docstring)."""
    w, h = img.size
    if (w, h) == (out_w, out_h):
        return np.asarray(img)
    scale = max(Fraction(out_w, w), Fraction(out_h, h))
    cover_w, cover_h = max(out_w, nearest(w * scale)), max(out_h, nearest(h * scale))
    if cover_w * cover_h <= 4 * out_w * out_h:
        left, top = (cover_w - out_w) // 2, (cover_h - out_h) // 2  # floor: an odd overhang leaves one more right
        scaled = np.asarray(img.resize((cover_w, cover_h), Image.LANCZOS))
        assert scaled.shape == (cover_h, cover_w, 3)
        return scaled[top:top + out_h, left:left + out_w]
    return np.asarray(ImageOps.fit(img, (out_w, out_h), Image.LANCZOS, centering=(0.5, 0.5)))


# (source width, height) -> (output width, height); the comment gives the cover size and the overhang
RESIZE_THEN_CROP = [
    ((101, 67), (64, 64)),    # 96x64 (96.48 rounded): squeezed by half a pixel, no crop
    ((640, 200), (64, 64)),   # 205x64: overhang 141, left 70
    ((203, 129), (64, 64)),   # 101x64: overhang 37, left 18
    ((129, 64), (64, 64)),    # 129x64 (scale 1, no resampling): overhang 65, left 32, a plain crop
    ((127, 128), (64, 64)),   # 64x65 (64.50 rounded up): overhang 1 at the bottom
    ((129, 128), (64, 64)),   # 64.5 rounds to even: 64x64, no crop
    ((333, 100), (64, 48)),   # 160x48 (159.84): overhang 96
    ((200, 100), (64, 48)),   # 96x48: overhang 32
    ((100, 333), (48, 64)),   # 48x160
    ((67, 101), (64, 96)),    # 64x96 (96.48 rounded): no crop
    ((1, 1), (64, 64)),       # one pixel: the output is its colour everywhere
    ((1, 1), (64, 96)),       # 96x96, overhang 32
    ((3, 2), (64, 64)),       # upscaled: 96x64
    ((256, 64), (64, 64)),    # 256x64: exactly 4x the output, still resize-then-crop (left 96)
]
KEPT_REGION = [  # the cover image would have more than 4x the output's pixels
    ((257, 64), (64, 64)),    # box from x = 96.5: a half-pixel shift, resampled
    ((7, 300), (64, 64)),     # 64x2743
    ((10000, 1), (64, 64)),   # 640000x64: a 1x1 box at the centre of the 1-pixel-high source
    ((1, 5000), (64, 64)),    # 64x320000
    ((1000, 3), (64, 64)),    # 21333x64
    ((5, 4000), (96, 64)),    # 96x76800
]


@pytest.mark.parametrize("source,output", RESIZE_THEN_CROP + KEPT_REGION)
def test_every_pixel_equals_the_written_out_cover_crop(source, output):
    img = ramps_and_noise(*source, seed=source[0] * 7 + source[1])
    got = np.asarray(resize_cover(img, output[1], output[0]))
    expected = reference(img, *output)
    assert got.shape == expected.shape == (output[1], output[0], 3)
    assert np.array_equal(got, expected), f"{np.abs(got.astype(int) - expected).max()} levels off"


@pytest.mark.parametrize("source,output", [
    ((130, 64), (64, 64)), ((3, 2), (64, 64)), ((400, 100), (64, 32)), ((1, 1), (64, 96)), ((256, 64), (64, 64)),
    ((64, 256), (64, 64))] + KEPT_REGION)
def test_equals_imageops_fit_where_the_centre_is_exact(source, output):
    """An independent centring: PIL's own `ImageOps.fit` (LANCZOS, centering (0.5, 0.5)). Resize-then-crop samples
    the same positions whenever the cover size is exact and the overhang even; the kept-region way is fit itself.
    Exact when the positions are exact in binary (integer or dyadic box edges, as in these cases): 200x100 ->
    64x48 samples the same positions in exact arithmetic, but fit's box edge 33.33... rounds differently in float
    and PIL's fixed-point Lanczos weights then differ by a level here and there."""
    img = ramps_and_noise(*source, seed=1)
    got = np.asarray(resize_cover(img, output[1], output[0]))
    fit = np.asarray(ImageOps.fit(img, output, Image.LANCZOS, centering=(0.5, 0.5)))
    assert np.array_equal(got, fit)


def test_odd_overhang_is_not_the_exact_centre():
    """The integer crop of an odd overhang sits half a pixel left of the exact centre: with no resampling (scale 1)
    it is a plain crop of the source from column 32 (a crop from 33 would be the other rounding)."""
    img = ramps_and_noise(129, 64, seed=3)
    got = np.asarray(resize_cover(img, 64, 64))
    assert np.array_equal(got, np.asarray(img)[:, 32:96])
    assert not np.array_equal(got, np.asarray(img)[:, 33:97])


@pytest.mark.parametrize("source,output", [((640, 200), (64, 64)), ((67, 101), (64, 96)), ((7, 300), (64, 64))])
def test_load_image_from_file_and_pil(source, output, tmp_path):
    """load_image (a PNG file and the PIL image) -> (1, 3, H, W) float32 = pixel / 255 * 2 - 1, every value."""
    img = ramps_and_noise(*source, seed=5)
    img.save(tmp_path / "in.png")
    pixels = torch.from_numpy(reference(img, *output).astype(np.float64)).permute(2, 0, 1)[None]
    for given in (tmp_path / "in.png", img, img.convert("RGBA")):
        got = load_image(given, output[1], output[0])
        assert got.shape == (1, 3, output[1], output[0]) and got.dtype == torch.float32
        # float32 rounding of k / 255 * 2 - 1 (at most 1.2e-7 off); the levels themselves exactly
        torch.testing.assert_close(got.double(), pixels / 255 * 2 - 1, rtol=0, atol=1e-6)
        assert torch.equal(((got.double() + 1) / 2 * 255).round(), pixels)


def test_grayscale_source_is_scaled_like_its_rgb():
    """An L-mode gradient covers like its RGB conversion: the mode is converted before resampling."""
    gray = Image.fromarray((np.add.outer(np.arange(67) * 3, np.arange(101) * 2) % 256).astype(np.uint8))
    got = load_image(gray, 64, 64)
    expected = torch.from_numpy(reference(gray.convert("RGB"), 64, 64).astype(np.float64)).permute(2, 0, 1)
    torch.testing.assert_close(((got[0].double() + 1) / 2 * 255).round(), expected, rtol=0, atol=0)
