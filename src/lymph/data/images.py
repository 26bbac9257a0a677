"""Decoding one cell image to a fixed-size uint8 CHW array (Pillow; no torch needed).

Every mode Pillow opens becomes the right 8-bit RGB picture, scaled, never clipped
(``docs/data-format.md``):

- ``RGB``; ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``RGBX``: Pillow's conversion to RGB;
- with alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, ``P`` with transparency):
  composited on white (the smear background is light);
- 16-bit grayscale (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) and 32-bit integer ``I``
  holding values in 0..65535: scaled by 255/65535 and rounded; ``I`` values outside that
  range are refused;
- 32-bit float ``F``: values in [0, 1] are scaled by 255, values in [0, 255] kept; other
  ranges (and NaN) are refused;
- any other mode (``HSV``, ``LAB``, ...) is refused by name.

A refused mode is an unreadable image (a warning, skipped; an error with ``--strict``).
EXIF orientation is applied (the picture a viewer shows). An image of more than
:data:`MAX_PIXELS` pixels (a decompression bomb) is an error, never decoded. An optional
centre crop (in source pixels) is taken before the resize.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np

from lymph.errors import LymphError

#: larger images are refused before decoding (cell images are ~ 0.05 Mpx)
MAX_PIXELS = 40_000_000
_DIRECT = ("RGB", "1", "L", "P", "CMYK", "YCbCr", "RGBX")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN = ("I;16", "I;16L", "I;16B", "I;16N")


class UnreadableImage(Exception):
    """An image file that cannot be decoded (truncated, empty, not an image, a mode that
    has no defined 8-bit picture)."""


class ImageRefused(LymphError):
    """An image that must not be decoded at all (a decompression bomb): an error."""


def _gray_to_rgb(x: np.ndarray) -> object:
    from PIL import Image

    g = np.clip(np.rint(x), 0, 255).astype(np.uint8)  # values already in range: no clipping
    return Image.fromarray(g, mode="L").convert("RGB")


def to_rgb8(im: object, path: str | Path) -> object:
    """``im`` as an 8-bit RGB Pillow image (see the module docstring), or UnreadableImage."""
    from PIL import Image

    mode = im.mode  # type: ignore[attr-defined]
    if mode == "RGB":
        return im
    if mode in _ALPHA or (mode == "P" and "transparency" in im.info):  # type: ignore[attr-defined]
        rgba = im.convert("RGBA")  # type: ignore[attr-defined]
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode in _DIRECT:
        return im.convert("RGB")  # type: ignore[attr-defined]
    if mode in _SIXTEEN or mode == "I":
        x = np.asarray(im, dtype=np.float64)
        if x.size and (x.min() < 0 or x.max() > 65535):
            raise UnreadableImage(f"{path}: mode {mode} with values {x.min():g}..{x.max():g} "
                                  "outside 0..65535: no defined 8-bit picture (refused)")
        return _gray_to_rgb(x * (255.0 / 65535.0))
    if mode == "F":
        x = np.asarray(im, dtype=np.float64)
        if not np.isfinite(x).all():
            raise UnreadableImage(f"{path}: mode F with NaN or infinite pixels (refused)")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1:
            return _gray_to_rgb(x * 255.0)
        if lo >= 0 and hi <= 255:
            return _gray_to_rgb(x)
        raise UnreadableImage(f"{path}: mode F with values {lo:g}..{hi:g}, neither in [0, 1] "
                              "nor in [0, 255]: no defined 8-bit picture (refused)")
    raise UnreadableImage(f"{path}: image mode {mode!r} is not supported (refused)")


def decode_image(path: str | Path, size: int, crop: int | None = None) -> np.ndarray:
    """Decode ``path`` to ``(3, size, size)`` uint8 RGB.

    ``crop``: side of the centre square (in source pixels) kept before resizing.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im0:
                w, h = im0.size
                if w * h > MAX_PIXELS:
                    raise ImageRefused(f"{path}: {w} x {h} pixels, more than lymph decodes "
                                       f"({MAX_PIXELS:,}); a decompression bomb or not a cell "
                                       "image: refused")
                im0.load()
                im = ImageOps.exif_transpose(im0)  # no-op without an orientation tag
                im = to_rgb8(im, path)
                if crop is not None:
                    w, h = im.size
                    c = min(crop, w, h)
                    left, top = (w - c) // 2, (h - c) // 2
                    im = im.crop((left, top, left + c, top + c))
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRefused(f"{path}: refused as a decompression bomb ({e})") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError,
            struct.error, ZeroDivisionError) as e:
        raise UnreadableImage(f"{path}: {e}") from None
    if arr.shape != (size, size, 3):
        raise UnreadableImage(f"{path}: decoded to shape {arr.shape}, expected RGB")
    return np.ascontiguousarray(arr.transpose(2, 0, 1))

