"""Cell montages: a patient's cells in a grid, each with a caption (Pillow, no matplotlib,
so a report with a dozen montages stays fast).

Pixels come from an image cache (:func:`lymph.data.cache.open_cache`) when one is given and
holds the store's images (matched by source path, or by position when the cache and the
store list the same patients and image counts), else from the source image files recorded
in the store's ``/images/path`` (the challenge JPEGs, 224 px). A store without paths and
without a matching cache raises :class:`~lymph.errors.LymphError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lymph.atomic import atomic_path
from lymph.errors import LymphError

TILE = 112  # pixels per cell in a montage


class PixelSource:
    """Reads the pixels of store instances (row indices into ``store.embeddings``)."""

    def __init__(self, store: Any, cache: Any = None) -> None:
        self.store, self.cache = store, cache
        self._by_path: dict[str, int] | None = None
        self._same_order = False
        if cache is not None:
            if store.image_paths is not None:
                self._by_path = {str(p): i for i, p in enumerate(cache.paths)}
            self._same_order = (cache.n_images == store.n_images
                                and list(cache.ids) == [str(i) for i in store.ids]
                                and np.array_equal(np.asarray(cache.patient_ptr), store.patient_ptr))

    def _cache_index(self, row: int) -> int | None:
        if self.cache is None:
            return None
        if self._by_path is not None and self.store.image_paths is not None:
            hit = self._by_path.get(str(self.store.image_paths[row]))
            if hit is not None:
                return hit
        return row if self._same_order else None

    def read(self, row: int) -> np.ndarray:
        """One instance's pixels, ``(h, w, 3)`` uint8."""
        i = self._cache_index(int(row))
        if i is not None:
            return np.transpose(self.cache.read(i, i + 1)[0], (1, 2, 0))
        paths = self.store.image_paths
        if paths is None:
            raise LymphError(f"{self.store.path or 'store'}: /images/path: the store records no "
                             "image paths and no matching image cache was given; pass the "
                             "image cache the store was made from")
        p = Path(str(paths[row]))
        try:
            from PIL import Image

            with Image.open(p) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise LymphError(f"{p}: cannot read the cell image recorded in the store's "
                             f"/images/path ({e}); pass the image cache instead") from None


    def read_bag(self, row: int) -> list[np.ndarray]:
        """All cells of store patient ``row`` (one cache read when the cache matches)."""
        a, b = int(self.store.patient_ptr[row]), int(self.store.patient_ptr[row + 1])
        if self._same_order and self.cache is not None and b > a:
            return [np.transpose(x, (1, 2, 0)) for x in self.cache.read(a, b)]
        return [self.read(i) for i in range(a, b)]


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def montage_image(cells: list[np.ndarray], captions: list[str], title: list[str] | str,
                  ncols: int = 8, section_titles: dict[int, str] | None = None,
                  tile: int = TILE, footer: list[str] | None = None) -> Any:
    """A PIL image: ``title`` lines, then the cells in rows of ``ncols`` with a caption
    under each, then the ``footer`` lines. ``section_titles[k]`` puts a heading before
    cell ``k`` (which starts a row)."""
    from PIL import Image, ImageDraw

    lines = [title] if isinstance(title, str) else list(title)
    sections = dict(section_titles or {})
    font, small = _font(14), _font(11)
    cap_lines = max([c.count("\n") + 1 for c in captions] or [1])
    cap_h = 13 * cap_lines + 4
    cols = max(1, min(ncols, len(cells)))
    # layout: rows of cells; a section heading forces a new row
    rows: list[tuple[str | None, list[int]]] = []
    for k in range(len(cells)):
        if k in sections or not rows or len(rows[-1][1]) == cols:
            rows.append((sections.get(k), [k]))
        else:
            rows[-1][1].append(k)
    pad = 6
    width = max(cols * (tile + pad) + pad, 640)
    head_h = 18 * len(lines) + 8
    foot = list(footer or [])
    height = (head_h + sum((18 if s else 0) + tile + cap_h + pad for s, _ in rows) + pad
              + 15 * len(foot))
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    y = 4
    for line in lines:
        d.text((pad, y), line, fill="black", font=font)
        y += 18
    y = head_h
    for sec, ks in rows:
        if sec:
            d.text((pad, y), sec, fill=(40, 40, 120), font=font)
            y += 18
        for j, k in enumerate(ks):
            x = pad + j * (tile + pad)
            cell = Image.fromarray(np.ascontiguousarray(cells[k], dtype=np.uint8)).resize(
                (tile, tile), Image.BILINEAR)
            img.paste(cell, (x, y))
            d.multiline_text((x, y + tile + 2), captions[k], fill="black", font=small, spacing=1)
        y += tile + cap_h + pad
    for line in foot:
        d.text((pad, y), line, fill=(60, 60, 60), font=small)
        y += 15
    return img


def save_png(img: Any, path: str | os.PathLike[str]) -> Path:
    """Write a PIL image as PNG atomically."""
    path = Path(path)
    from PIL.PngImagePlugin import PngInfo

    stamp = PngInfo()
    stamp.add_text("Software", "lymph")  # lets lymph recognise its own PNG (lymph.outputs)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", compress_level=1, pnginfo=stamp)
    return path


def top_bottom(weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the ``k`` highest and ``k`` lowest weights (highest first; lowest last).
    A bag of at most ``2k`` cells is shown whole: top half, then the rest."""
    order = np.argsort(-np.asarray(weights), kind="stable")
    if order.size <= 2 * k:
        h = (order.size + 1) // 2
        return order[:h], order[h:]
    return order[:k], order[-k:]


def patient_montage(store: Any, row: int, weights: np.ndarray, *, k: int = 8,
                    source: PixelSource | None = None, title: list[str] | str = "",
                    notes: dict[int, str] | None = None, weight_name: str = "w") -> Any:
    """Montage of one patient's top-``k`` and bottom-``k`` cells by ``weights`` (one per
    instance, store order), each captioned with its index and weight; ``notes[pos]`` (a text
    about cell ``pos``) are listed under the grid."""
    source = source or PixelSource(store)
    w = np.asarray(weights, dtype=np.float64)
    start = int(store.patient_ptr[row])
    top, bottom = top_bottom(w, k)
    pos = list(top) + list(bottom)
    cells = [source.read(start + int(j)) for j in pos]
    caps = [f"#{int(j)} {weight_name}={w[j]:.3g}" for j in pos]
    footer = [f"#{int(j)}: {notes[int(j)]}" for j in pos if notes and int(j) in notes]
    sections = {0: f"highest {weight_name} ({len(top)} of {w.size})"}
    if len(bottom):
        sections[len(top)] = f"lowest {weight_name} ({len(bottom)} of {w.size})"
    return montage_image(cells, caps, title, ncols=max(len(top), 1), section_titles=sections,
                         footer=footer)


def clinical_text(store: Any, row: int) -> str:
    """The patient's clinical values, readable (``log_lymph_count`` also as the count)."""
    parts = []
    for j, c in enumerate(store.clinical_columns):
        v = float(store.clinical[row, j])
        if c == "log_lymph_count":
            parts.append(f"lymph count {np.exp(v):.1f} x10^9/L")
        elif c == "gender_male":
            parts.append("male" if v >= 0.5 else "female")
        elif c == "age":
            parts.append(f"age {v:.0f}")
        else:
            parts.append(f"{c} {v:.3g}")
    return ", ".join(parts) if parts else "no clinical data"


def cell_weights(m: Any) -> tuple[dict[str, np.ndarray], str]:
    """A model's out-of-fold cell ranking: cell scores when it has them (late fusion, whose
    attention is uniform), else attention weights; and the caption name."""
    if getattr(m, "cell_scores", None):
        return m.cell_scores, "score"
    return m.attention, "w"
