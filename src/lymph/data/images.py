"""Decoding one cell image to a fixed-size uint8 CHW array (Pillow; no torch needed).

Grayscale, palette and RGBA images become RGB; an image of another size is resized. An
optional centre crop (in source pixels) is taken before the resize.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class UnreadableImage(Exception):
    """An image file that cannot be decoded (truncated, empty, not an image)."""


def decode_image(path: str | Path, size: int, crop: int | None = None) -> np.ndarray:
    """Decode ``path`` to ``(3, size, size)`` uint8 RGB.

    ``crop``: side of the centre square (in source pixels) kept before resizing.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    # composite on white: the smear background is light
                    im = im.convert("RGBA")
                    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, im)
                im = im.convert("RGB")
            if crop is not None:
                w, h = im.size
                c = min(crop, w, h)
                left, top = (w - c) // 2, (h - c) // 2
                im = im.crop((left, top, left + c, top + c))
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise UnreadableImage(f"{path}: {e}") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
