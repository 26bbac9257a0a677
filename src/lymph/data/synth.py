"""`lymph synth`: a synthetic dataset in exactly the challenge layout.

Shaped like the real data, with a learnable signal in both sources:

- clinical: reactive lymph counts mostly 4 to 8 (10^9/L), malignant ones log-normal over
  2 to 300; malignant patients a little older;
- images: a drawn cell (textured nucleus disc inside a cytoplasm ring on a smear-coloured
  background). Only a fraction of a malignant patient's cells are atypical (larger, darker,
  irregular nuclei), so the bag carries the label, not every instance.

Quirks of the real data are reproduced: both DOB formats, one lowercase gender, a test
split with LABEL -1, ``clinical_annotation.csv`` with its unnamed index column, ``.DS_Store``
debris. ``synth_truth.csv`` at the root records which cells are atypical (for tests).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lymph.atomic import atomic_path
from lymph.data.challenge import REFERENCE_DATE
from lymph.errors import LymphError

#: nucleus radius as a fraction of the image side: typical vs atypical cells
TYPICAL_NUCLEUS = 0.16
ATYPICAL_NUCLEUS = 0.23


@dataclass
class SynthConfig:
    patients: int = 40  # labelled (train) patients
    test_patients: int = 6  # LABEL -1
    images_min: int = 8
    images_max: int = 24
    size: int = 224
    malignant_fraction: float = 0.65
    atypical_min: float = 0.3  # fraction of a malignant patient's cells that are atypical
    atypical_max: float = 0.7
    seed: int = 0

    def check(self) -> None:
        if self.patients < 2:
            raise LymphError(f"patients: expected at least 2, got {self.patients}")
        if self.test_patients < 0:
            raise LymphError(f"test_patients: expected 0 or more, got {self.test_patients}")
        if not 1 <= self.images_min <= self.images_max:
            raise LymphError(
                f"images: expected MIN:MAX with 1 <= MIN <= MAX, got {self.images_min}:{self.images_max}"
            )
        if self.size < 16:
            raise LymphError(f"size: expected at least 16 pixels, got {self.size}")


def parse_range(value: str, option: str) -> tuple[int, int]:
    """``"MIN:MAX"`` (or ``"N"``) -> ``(MIN, MAX)``; ``option`` names the setting in errors."""
    try:
        a, _, b = str(value).partition(":")
        lo, hi = int(a), int(b or a)
    except ValueError:
        raise LymphError(f"{option}: expected MIN:MAX (e.g. 8:24), got {value!r}") from None
    return lo, hi


def draw_cell(rng: np.random.Generator, size: int, atypical: bool) -> np.ndarray:
    """One cell image, ``(size, size, 3)`` uint8 RGB. Nucleus radius is known:
    ``TYPICAL_NUCLEUS * size`` (or ``ATYPICAL_NUCLEUS``) times a factor in [0.93, 1.07]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy = size / 2 + rng.uniform(-0.03, 0.03) * size
    cx = size / 2 + rng.uniform(-0.03, 0.03) * size
    dy, dx = yy - cy, xx - cx
    r = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    bg = np.array([0.82, 0.70, 0.70]) + rng.normal(0, 0.02, 3)
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    img += rng.normal(0, 0.015, (size, size, 1))
    # a few red blood cells in the background
    for _ in range(rng.integers(0, 4)):
        ry, rx = rng.uniform(0, size, 2)
        rr = rng.uniform(0.12, 0.18) * size
        m = np.hypot(yy - ry, xx - rx) < rr
        img[m] = np.array([0.85, 0.55, 0.55]) + rng.normal(0, 0.01, 3)
    cell_r = rng.uniform(0.27, 0.31) * size
    cyto = r < cell_r
    img[cyto] = np.array([0.70, 0.72, 0.86]) + rng.normal(0, 0.02, 3)
    base = (ATYPICAL_NUCLEUS if atypical else TYPICAL_NUCLEUS) * size * rng.uniform(0.93, 1.07)
    if atypical:
        k = int(rng.integers(3, 6))
        edge = base * (1 + 0.12 * np.sin(k * theta + rng.uniform(0, 2 * np.pi)))
        colour = np.array([0.30, 0.15, 0.42])
    else:
        edge = np.full_like(theta, base)
        colour = np.array([0.45, 0.30, 0.62])
    nucleus = r < edge
    texture = rng.normal(0, 0.06 if atypical else 0.03, (size, size, 1))
    img[nucleus] = (colour + rng.normal(0, 0.02, 3) + texture[nucleus]).astype(img.dtype)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _dob_string(rng: np.random.Generator, age: float, use_slash: bool) -> str:
    dob = REFERENCE_DATE - dt.timedelta(days=int(age * 365.25))
    if use_slash:
        return f"{dob.month}/{dob.day}/{dob.year}"
    return f"{dob.day:02d}-{dob.month:02d}-{dob.year}"


def make_synthetic(out_dir: str | Path, cfg: SynthConfig | None = None) -> Path:
    """Write the synthetic dataset to ``out_dir`` (atomically) and return its path."""
    from PIL import Image

    cfg = cfg or SynthConfig()
    cfg.check()
    out = Path(out_dir)
    rng = np.random.default_rng(cfg.seed)
    n_all = cfg.patients + cfg.test_patients
    ids = [f"P{i}" for i in rng.permutation(np.arange(n_all) + 1)]
    rows: list[dict[str, object]] = []
    truth: list[str] = ["patient,image,atypical"]
    n_mal = int(round(cfg.malignant_fraction * cfg.patients))
    labels = np.array([1] * n_mal + [0] * (cfg.patients - n_mal))
    rng.shuffle(labels)
    from lymph.outputs import check_output

    check_output(out, "synth", name="dataset")  # replaces only a synthetic dataset
    with atomic_path(out) as tmp:
        (tmp / "trainset").mkdir(parents=True)
        (tmp / "testset").mkdir()
        for i, pid in enumerate(ids):
            split = "trainset" if i < cfg.patients else "testset"
            true_label = int(labels[i]) if i < cfg.patients else int(rng.random() < cfg.malignant_fraction)
            if true_label:
                lymph = float(np.clip(np.exp(rng.normal(np.log(16.0), 1.1)), 2.0, 300.0))
                age = float(np.clip(rng.normal(72, 11), 35, 98))
                frac = rng.uniform(cfg.atypical_min, cfg.atypical_max)
            else:
                lymph = float(np.clip(np.exp(rng.normal(np.log(5.6), 0.2)), 2.3, 12.0))
                age = float(np.clip(rng.normal(58, 17), 18, 95))
                frac = 0.0
            gender = "M" if rng.random() < 0.55 else "F"
            if i == 1:
                gender = "f"  # the real data's one lowercase gender
            rows.append(
                {
                    "ID": pid,
                    "LABEL": true_label if split == "trainset" else -1,
                    "GENDER": gender,
                    "DOB": _dob_string(rng, age, use_slash=bool(i % 3)),
                    "LYMPH_COUNT": round(lymph, 2),
                    "split": split,
                }
            )
            pdir = tmp / split / pid
            pdir.mkdir()
            n_img = int(rng.integers(cfg.images_min, cfg.images_max + 1))
            atyp = rng.random(n_img) < frac
            if true_label and not atyp.any():
                atyp[rng.integers(n_img)] = True
            for j in range(n_img):
                Image.fromarray(draw_cell(rng, cfg.size, bool(atyp[j]))).save(
                    pdir / f"{j:06d}.jpg", quality=92
                )
                truth.append(f"{pid},{j:06d}.jpg,{int(atyp[j])}")
        header = "ID,LABEL,GENDER,DOB,LYMPH_COUNT"
        for split, name in (("trainset", "trainset_true.csv"), ("testset", "testset_data.csv")):
            lines = [header] + [
                f"{r['ID']},{r['LABEL']},{r['GENDER']},{r['DOB']},{r['LYMPH_COUNT']}"
                for r in rows if r["split"] == split
            ]
            (tmp / split / name).write_text("\n".join(lines) + "\n")
            (tmp / split / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        ann = [",ID,LABEL,GENDER,DOB,LYMPH_COUNT"] + [
            f"{k},{r['ID']},{r['LABEL']},{r['GENDER']},{r['DOB']},{r['LYMPH_COUNT']}"
            for k, r in enumerate(rows)
        ]
        (tmp / "clinical_annotation.csv").write_text("\n".join(ann) + "\n")
        (tmp / "synth_truth.csv").write_text("\n".join(truth) + "\n")
        (tmp / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return out
