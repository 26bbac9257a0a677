"""Every image mode Pillow opens decodes to the right 8-bit RGB picture or is refused by
name (issue 15, class 2); EXIF orientation is applied; decompression bombs are errors.

Each mode is written from a known gray ramp (or colour) and decoded; the result must match
the 8-bit picture within rounding (scaled, never clipped: a 16-bit ramp spans 0..255).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reliability_helpers import SIZE, cli, make_tiny

from lymph.data.images import ImageRefused, UnreadableImage, decode_image

N = 32
RAMP8 = np.tile(np.linspace(0, 255, N).round().astype(np.uint8), (N, 1))  # (N, N), columns


def gray_rgb(x8: np.ndarray) -> np.ndarray:
    return np.repeat(x8[None], 3, axis=0)


def save(im: Image.Image, path: Path) -> Path:
    im.save(path)
    return path


# (mode, builder writing the file, expected (3, N, N) uint8)
def _l(p: Path) -> Path:
    return save(Image.fromarray(RAMP8, "L"), p / "l.png")


def _one(p: Path) -> Path:
    return save(Image.fromarray(RAMP8 > 127).convert("1"), p / "one.png")


def _p(p: Path) -> Path:
    return save(Image.fromarray(RAMP8, "L").convert("P"), p / "p.png")


def _i16(p: Path) -> Path:
    x = np.tile(np.linspace(0, 65535, N).round().astype(np.uint16), (N, 1))
    return save(Image.fromarray(x), p / "i16.png")


def _i32(p: Path) -> Path:
    x = np.tile(np.linspace(0, 65535, N).round().astype(np.int32), (N, 1))
    return save(Image.fromarray(x), p / "i32.tiff")


def _f01(p: Path) -> Path:
    return save(Image.fromarray((RAMP8 / 255.0).astype(np.float32)), p / "f.tiff")


def _la(p: Path) -> Path:
    im = Image.fromarray(RAMP8, "L").convert("LA")
    return save(im, p / "la.png")  # opaque alpha: the ramp itself


def _rgba(p: Path) -> Path:
    im = Image.fromarray(RAMP8, "L").convert("RGBA")
    return save(im, p / "rgba.png")


def _cmyk(p: Path) -> Path:
    return save(Image.fromarray(RAMP8, "L").convert("RGB").convert("CMYK"), p / "cmyk.tiff")


def _ycbcr(p: Path) -> Path:
    return save(Image.fromarray(RAMP8, "L").convert("RGB").convert("YCbCr"), p / "ycc.tiff")


MODES = [
    ("L", _l, gray_rgb(RAMP8), 0),
    ("1", _one, gray_rgb(np.where(RAMP8 > 127, 255, 0).astype(np.uint8)), 0),
    ("P", _p, gray_rgb(RAMP8), 1),
    ("I;16", _i16, gray_rgb(RAMP8), 1),
    ("I", _i32, gray_rgb(RAMP8), 1),
    ("F", _f01, gray_rgb(RAMP8), 1),
    ("LA", _la, gray_rgb(RAMP8), 0),
    ("RGBA", _rgba, gray_rgb(RAMP8), 0),
    ("CMYK", _cmyk, gray_rgb(RAMP8), 1),
    ("YCbCr", _ycbcr, gray_rgb(RAMP8), 2),
]


@pytest.mark.parametrize("mode, build, want, tol", MODES, ids=[m[0] for m in MODES])
def test_mode_decodes_to_the_right_8bit_rgb(tmp_path: Path, mode: str, build, want, tol) -> None:
    path = build(tmp_path)
    with Image.open(path) as im:
        assert im.mode == mode or (mode == "I" and im.mode.startswith("I"))
    got = decode_image(path, N)
    assert got.dtype == np.uint8 and got.shape == (3, N, N)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= tol
    assert got.max() >= 254 and got.min() <= 1  # scaled over the whole range, not clipped


def test_transparent_pixels_composite_on_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (N, N), (0, 0, 0, 0))
    got = decode_image(save(im, tmp_path / "t.png"), N)
    assert (got == 255).all()


@pytest.mark.parametrize("make, why", [
    (lambda p: save(Image.fromarray(np.full((N, N), 70000, np.int32)), p / "big.tiff"),
     "outside 0..65535"),
    (lambda p: save(Image.fromarray(np.full((N, N), 3.5e3, np.float32)), p / "f.tiff"),
     "neither in"),
    (lambda p: save(Image.fromarray(np.full((N, N), np.nan, np.float32)), p / "nan.tiff"),
     "NaN"),
    (lambda p: save(Image.new("RGB", (N, N)).convert("LAB"), p / "lab.tiff"), "'LAB'"),
])
def test_modes_without_a_defined_picture_are_refused_by_name(tmp_path: Path, make,
                                                             why: str) -> None:
    with pytest.raises(UnreadableImage, match=why):
        decode_image(make(tmp_path), N)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A 2:1 picture stored sideways with orientation 6 (rotate 90 clockwise to view)."""
    x = np.zeros((20, 40, 3), np.uint8)
    x[:, :20] = 255  # left half white as viewed
    viewed = Image.fromarray(x)
    stored = viewed.transpose(Image.Transpose.ROTATE_90)  # how a camera stores it
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "o.png"
    stored.save(p, exif=exif)
    got = decode_image(p, 40, None)
    want = np.asarray(viewed.resize((40, 40), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A 1-bit PNG header declaring side x side pixels (a few hundred bytes on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_an_error(tmp_path: Path) -> None:
    for side in (7_000, 100_000):  # above lymph's limit; above Pillow's own too
        with pytest.raises(ImageRefused, match="decompression bomb"):
            decode_image(bomb_png(tmp_path / "b.png", side), N)
    data = make_tiny(tmp_path / "data", patients=4, test_patients=0)
    victim = min((data / "trainset").glob("P*/*.jpg"))
    victim.unlink()
    bomb_png(victim.with_suffix(".png"))
    for workers in ("1", "2"):
        r = cli("ingest", data, "--out", tmp_path / "c.zarr", "--size", SIZE, "--workers", workers)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert "decompression bomb" in r.output and victim.stem in r.output
        assert not (tmp_path / "c.zarr").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.zarr")]
