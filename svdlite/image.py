"""The conditioning image: reading a file, converting any PIL mode to RGB, cover-resizing, checking tensors.

What happens to each kind of input (README "Inputs and what svdlite says"):
- a file is opened by PIL; a multi-frame file (animated GIF/PNG/WebP, multi-page TIFF) gives its first frame;
  the EXIF orientation tag is applied, so rotated phone photos come out upright;
- transparency (RGBA, LA, PA, P with a transparent colour) is composited over white: the colour stored under a
  fully transparent pixel is arbitrary (often black). sgm and diffusers drop alpha instead;
- 16-bit grayscale (I;16*, and I, which PIL uses for 16-bit PNGs) is scaled from 0..65535, float (F) images
  must hold values in [0, 1]; both then become 8-bit gray like every other mode (L, 1, CMYK, YCbCr, ...);
  embedded ICC colour profiles are not applied;
- images above MAX_PIXELS are refused before they are decoded.
"""
from pathlib import Path

import numpy as np
import torch

MAX_PIXELS = 2**27  # 134M pixels, e.g. 11585x11585: refused above this, before decoding (RGB copy: 384 MiB)
WHITE = (255, 255, 255)


class ImageError(ValueError):
    """An input image svdlite cannot use; the message names the file (or the image) and the cause."""


def open_image(path):
    """Read an image file fully -> an RGB PIL image (first frame, EXIF orientation applied, alpha over white).

    Every failure is an ImageError (a ValueError), FileNotFoundError or PermissionError naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input image {path} not found")
    if path.is_dir():
        raise IsADirectoryError(f"input image {path} is a folder; expected an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"input image {path} is empty (0 bytes)")
    try:
        return _read(path)
    except (ImageError, PermissionError):
        raise
    except UnidentifiedImageError as err:
        raise ImageError(f"input image {path} is not an image PIL can read (PNG, JPEG, WebP, ...)") from err
    except (Image.DecompressionBombError, MemoryError) as err:
        raise ImageError(f"input image {path} is too large to decode; svdlite reads images of at most "
                         f"{MAX_PIXELS:,} pixels (scale it down first)") from err
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise many types (OSError, ValueError, SyntaxError,
        # struct.error, IndexError, ...) on damaged data; all of them mean the same thing here
        raise ImageError(f"input image {path} is corrupt or truncated ({type(err).__name__}: {err})") from err


def _read(path: Path):
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS is the limit here
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"input image {path} is {img.width}x{img.height} pixels; svdlite reads images of "
                                 f"at most {MAX_PIXELS:,} pixels (scale it down first)")
            img.seek(0)  # multi-frame files: the first frame
            img.load()
            return to_rgb(img, name=str(path))


def to_rgb(img, name: str = "image"):
    """Any PIL image -> RGB: EXIF orientation applied, transparency composited over white (module docstring)."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = Image.fromarray(_gray_to_uint8(img, name))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        img = Image.alpha_composite(background, rgba)
    try:
        return img.convert("RGB")
    except ValueError as err:
        raise ImageError(f"{name}: cannot convert PIL mode {img.mode!r} to RGB ({err})") from err


def _gray_to_uint8(img, name: str) -> np.ndarray:
    """16-bit or 32-bit integer gray (0..65535) and float gray ([0, 1]) -> uint8 gray, rounded."""
    values = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        low, high, full = 0.0, 1.0, 1.0
    else:
        low, high, full = 0.0, 65535.0, 65535.0
    if values.size and not (np.isfinite(values).all() and values.min() >= low and values.max() <= high):
        raise ImageError(f"{name}: PIL mode {img.mode!r} values must lie in [{low:g}, {high:g}], got "
                         f"[{np.nanmin(values):g}, {np.nanmax(values):g}]")
    return np.round(values * (255.0 / full)).astype(np.uint8)


def resize_cover(img, height: int, width: int):
    """Scale to cover width x height (aspect kept, Lanczos) and centre-crop, the way sgm's gradio demo does.

    The scaled size is rounded to the nearest pixel and the crop starts at floor(overhang / 2); sgm's demo truncates
    the size and lets PIL round its crop box, so for some sizes (1000x700 to 1024x576, say) the two are a pixel
    apart. Above 4x the output's pixels only the kept region is resampled (PIL's `box`, the same as
    `ImageOps.fit`), so an extreme aspect ratio never makes a huge copy."""
    from PIL import Image

    if img.size == (width, height):
        return img
    scale = max(width / img.width, height / img.height)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    if size[0] * size[1] <= 4 * width * height:  # the plain resize-then-crop
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        return img.resize(size, Image.LANCZOS).crop((left, top, left + width, top + height))
    box_w, box_h = width / scale, height / scale
    left, top = (img.width - box_w) / 2, (img.height - box_h) / 2
    return img.resize((width, height), Image.LANCZOS, box=(left, top, left + box_w, top + box_h))


def check_image_tensor(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A (3, H, W) or (1, 3, H, W) floating tensor in [0, 1] of the target size -> (1, 3, H, W)."""
    if image.is_floating_point() is False:
        raise ValueError(f"image tensor must be floating point with values in [0, 1], got {image.dtype}"
                         + ("; divide a uint8 image by 255" if image.dtype == torch.uint8 else ""))
    given = tuple(image.shape)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[:2] != (1, 3):
        hint = "; channels come first: (3, H, W)" if given[-1:] == (3,) else ""
        raise ValueError(f"image tensor must be (3, H, W) or (1, 3, H, W), got {given}{hint}")
    if image.shape[-2:] != (height, width):
        raise ValueError(f"image tensor is {tuple(image.shape[-2:])}, expected (height, width) = ({height}, {width}); "
                         "pass a PIL image or a path to have it resized")
    if not torch.isfinite(image).all():
        raise ValueError("image tensor holds NaN or infinite values; expected values in [0, 1]")
    if image.min() < 0 or image.max() > 1:
        raise ValueError(f"image tensor values must lie in [0, 1], got [{image.min():.3g}, {image.max():.3g}]")
    return image


def load_image(image, height: int, width: int) -> torch.Tensor:
    """A path, PIL image or tensor -> (1, 3, height, width) float32 in [-1, 1].

    Tensors are (3, H, W) or (1, 3, H, W) in [0, 1] (diffusers' convention). An image of another size is scaled
    to cover height x width (Lanczos, aspect kept) and centre-cropped, as sgm's gradio demo does."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        image = open_image(image)  # RGB already
    elif isinstance(image, Image.Image):
        image = to_rgb(image)
    if isinstance(image, Image.Image):
        image = resize_cover(image, height, width)
        image = torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a path, a PIL image or a tensor, got {type(image).__name__}")
    return check_image_tensor(image, height, width).float() * 2.0 - 1.0
