"""Read any photo a user has into the float [0, 1] (3, 32, 32) tensor the models take.

Formats are whatever Pillow decodes (PNG, JPEG, BMP, WebP, GIF, TIFF, ...); modes are
normalised to RGB: greyscale is replicated, palette and CMYK are converted, 16-bit and float
greyscale are scaled by their own range (Pillow's ``convert("RGB")`` would clip them to 255,
turning most 16-bit images white), and transparency is composited on white.

Why white rather than dropping alpha: fully transparent pixels keep whatever colour the
encoder left there (often black, sometimes noise), which no viewer ever shows; a browser
or image viewer shows the image over a light page, so white is what the user saw.

Geometry: the largest centred square is cut out and resized to 32x32 with Lanczos
(``reducing_gap``: first a fast integer box reduction, then Lanczos for the last <= 3x).
Lanczos is antialiased when shrinking a photo and smooth when enlarging a thumbnail, where
a box filter would be blocky. A centre square keeps objects in proportion, as CIFAR's
square, centred images are; squashing a wide photo would distort them.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifar100.errors import UserError

IMAGE_SIZE = 32
# Pillow's own warning threshold (about 89 MP, a quarter of a GB as 8-bit RGB). Above it we
# refuse instead of warning: a small file that claims 40,000 x 40,000 pixels is an attack.
MAX_PIXELS = 89_478_485
RESIZE_FILTER = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0
ALPHA_BACKGROUND = (255, 255, 255)

# Errors Pillow raises on broken files, besides OSError (truncated data, unknown format).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
# EXIF orientation -> the transpose that shows the photo upright (phones store it sideways).
_ORIENTATION = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_270],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_90],
}


class ImageError(UserError):
    """An image that cannot be read; the message names the file and the problem."""


def read_image(
    path: str | Path, size: int = IMAGE_SIZE, max_pixels: int = MAX_PIXELS
) -> torch.Tensor:
    """Decode ``path`` into a float32 (3, size, size) tensor in [0, 1].

    Raises:
        ImageError: missing file, not an image, truncated data, too many pixels, or a
            mode that has no RGB meaning.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: {'not a file' if path.exists() else 'file not found'}")
    try:
        with warnings.catch_warnings():
            # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; make it fatal.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return _decode(image, path, size, max_pixels)
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"{path}: too many pixels (decompression bomb?), limit {max_pixels:,}"
        ) from None
    except _DECODE_ERRORS as error:
        raise ImageError(f"{path}: unreadable or truncated image ({_reason(error)})") from None


def _reason(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _decode(image: Image.Image, path: Path, size: int, max_pixels: int) -> torch.Tensor:
    width, height = image.size  # read from the header: nothing decoded yet
    if width * height > max_pixels:
        raise ImageError(
            f"{path}: {width}x{height} is {width * height:,} pixels, over the "
            f"limit of {max_pixels:,} (decompression bomb?)"
        )
    orientation = image.getexif().get(0x0112, 1)
    # JPEG can decode at 1/2, 1/4 or 1/8 scale for free: a 24 MP photo never fully decodes.
    image.draft(None, (size * int(REDUCING_GAP), size * int(REDUCING_GAP)))
    image.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES stays off)
    rgb = to_rgb(image, path)
    small = rgb.resize(
        (size, size), RESIZE_FILTER, box=centre_square(rgb.size), reducing_gap=REDUCING_GAP
    )
    # A centred square crop commutes with rotations and flips, so orienting the 32x32
    # result is the same as orienting the full photo first, and much cheaper.
    for method in _ORIENTATION.get(orientation, []):
        small = small.transpose(method)
    array = np.asarray(small, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)


def centre_square(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest centred square in an image of ``size``."""
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, alpha composited on white, high bit depths rescaled."""
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _wide_grey_to_rgb(image)
    if mode in ("P", "L", "RGB") and "transparency" in image.info:  # a colour key (tRNS)
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
    except ValueError:
        raise ImageError(f"{path}: colour mode {mode} cannot be converted to RGB") from None


def _wide_grey_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float greyscale -> 8-bit RGB, scaled by the type's range."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scale = 65535.0
    elif image.mode == "F" and values.size and np.nanmax(values) <= 1.0:
        scale = 1.0  # float images conventionally hold [0, 1]
    else:  # 'I' is how Pillow opens 16-bit PNGs (and 32-bit TIFFs): guess from the values
        peak = np.nanmax(values) if values.size else 0
        scale = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else float(peak)
    grey = np.clip(np.nan_to_num(values / scale), 0.0, 1.0)
    grey8 = np.round(grey * 255.0).astype(np.uint8)
    return Image.fromarray(grey8).convert("RGB")
