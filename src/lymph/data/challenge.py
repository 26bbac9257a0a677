"""Reading the DLMI challenge layout: patient table and per-patient image paths.

Accepted inputs (see ``docs/data-format.md``):

- a challenge root: ``trainset/`` with ``trainset_true.csv`` and/or ``testset/`` with
  ``testset_data.csv`` (any one CSV per split folder), each with ``P<id>/NNNNNN.jpg`` folders;
- a single split folder: one CSV plus the patient folders.

CSV columns ``ID,LABEL,GENDER,DOB,LYMPH_COUNT`` (an unnamed leading pandas index column, as
in ``clinical_annotation.csv``, is dropped). DOB is parsed by its separator, never guessed:
``M/D/YYYY`` with ``/``, ``DD-MM-YYYY`` with ``-`` (``YYYY-MM-DD`` is accepted too).
Ages are whole-and-fractional years at :data:`REFERENCE_DATE`.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lymph.errors import LymphError

log = logging.getLogger("lymph")

REQUIRED_COLUMNS = ("ID", "LABEL", "GENDER", "DOB", "LYMPH_COUNT")
#: Ages are computed at this fixed date so that a patient's features never drift with the
#: day a model is run. The challenge data were collected before it.
REFERENCE_DATE = dt.date(2022, 1, 1)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
CLINICAL_COLUMNS = ("age", "log_lymph_count", "gender_male")
_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_SPLIT_CSV_PREFERENCE = ("trainset_true.csv", "testset_data.csv")
#: a plain decimal number as a lab system writes it: no '_' separators, no inf/nan, no hex
_NUMBER_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
MAX_LYMPH_COUNT = 1000.0  # x 10^9/L; the dev set's highest is 295
MAX_AGE = 120.0  # years at REFERENCE_DATE; an older patient is a typing error


@dataclass
class Patient:
    id: str
    label: int
    gender: str  # "M" or "F"
    dob: dt.date
    lymph_count: float
    split: str
    image_paths: list[Path] = field(default_factory=list)

    @property
    def age(self) -> float:
        return (REFERENCE_DATE - self.dob).days / 365.25


@dataclass
class ChallengeData:
    """The patients of a challenge root or split folder, in CSV order (splits: train, test)."""

    root: Path
    patients: list[Patient]

    def __len__(self) -> int:
        return len(self.patients)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.patients]

    @property
    def n_images(self) -> int:
        return sum(len(p.image_paths) for p in self.patients)

    def image_paths(self) -> list[Path]:
        """All image paths, patient after patient, each patient's in file order."""
        return [path for p in self.patients for path in p.image_paths]

    def patient_ptr(self) -> np.ndarray:
        sizes = [len(p.image_paths) for p in self.patients]
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def table(self):  # -> pandas.DataFrame
        import pandas as pd

        return pd.DataFrame(
            {
                "id": [p.id for p in self.patients],
                "label": [p.label for p in self.patients],
                "gender": [p.gender for p in self.patients],
                "dob": [p.dob.isoformat() for p in self.patients],
                "age": [round(p.age, 4) for p in self.patients],
                "lymph_count": [p.lymph_count for p in self.patients],
                "split": [p.split for p in self.patients],
                "n_images": [len(p.image_paths) for p in self.patients],
            }
        )


def clinical_features(
    age: np.ndarray, lymph_count: np.ndarray, gender: list[str] | np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """The clinical feature matrix written to stores: age, log lymph count, gender (M = 1)."""
    x = np.stack(
        [
            np.asarray(age, dtype=np.float64),
            np.log(np.asarray(lymph_count, dtype=np.float64)),
            np.asarray([1.0 if g == "M" else 0.0 for g in gender]),
        ],
        axis=1,
    ).astype(np.float32)
    return x, list(CLINICAL_COLUMNS)


# ---- parsing one field at a time ----------------------------------------------------------
def parse_dob(value: str, where: str) -> dt.date:
    """Parse a DOB by its separator: ``M/D/YYYY``, ``DD-MM-YYYY`` or ``YYYY-MM-DD``."""
    s = str(value).strip()
    try:
        if not re.fullmatch(r"\d{1,4}([/-])\d{1,4}\1\d{1,4}", s):
            raise ValueError
        if "/" in s:
            m, d, y = (int(x) for x in s.split("/"))
        elif "-" in s:
            a, b, c = s.split("-")
            if len(a) == 4:
                y, m, d = int(a), int(b), int(c)
            else:
                d, m, y = int(a), int(b), int(c)
        else:
            raise ValueError
        if y < 1000:
            raise ValueError
        date = dt.date(y, m, d)
    except ValueError:
        raise LymphError(
            f"{where}, field DOB: {s!r} is not a date in M/D/YYYY or DD-MM-YYYY format"
        ) from None
    if date > dt.date.today():
        raise LymphError(f"{where}, field DOB: {s!r} lies in the future")
    age = (REFERENCE_DATE - date).days / 365.25
    if age > MAX_AGE:
        raise LymphError(f"{where}, field DOB: {s!r} gives an age of {age:.0f} years at "
                         f"{REFERENCE_DATE.isoformat()}; expected 0 to {MAX_AGE:.0f}")
    if age < 0:
        raise LymphError(f"{where}, field DOB: {s!r} is after {REFERENCE_DATE.isoformat()}, the "
                         "date at which ages are computed (a negative age); expected an "
                         "earlier date")
    return date


def parse_lymph_count(value: str, where: str) -> float:
    s = str(value).strip()
    try:
        if not _NUMBER_RE.match(s):
            raise ValueError
        x = float(s)
    except ValueError:
        raise LymphError(
            f"{where}, field LYMPH_COUNT: {s!r} is not a number (expected lymphocytes in 10^9/L)"
        ) from None
    if not math.isfinite(x) or x <= 0:
        raise LymphError(
            f"{where}, field LYMPH_COUNT: {s!r} must be a positive number (lymphocytes in 10^9/L)"
        )
    if x > MAX_LYMPH_COUNT:
        raise LymphError(
            f"{where}, field LYMPH_COUNT: {s!r} is above {MAX_LYMPH_COUNT:g}, more than any "
            "blood holds: expected lymphocytes in 10^9/L (not per microlitre)")
    return x


def parse_label(value: str, where: str) -> int:
    s = str(value).strip()
    try:
        if not _NUMBER_RE.match(s):
            raise ValueError
        f = float(s)
        if f != int(f):
            raise ValueError
        label = int(f)
    except ValueError:
        label = None
    if label not in (0, 1, -1):
        raise LymphError(
            f"{where}, field LABEL: {s!r} is not one of 1 (malignant), 0 (reactive), -1 (unknown)"
        )
    return label


def parse_gender(value: str, where: str) -> str:
    s = str(value).strip().upper()
    if s not in ("M", "F"):
        raise LymphError(f"{where}, field GENDER: {value!r} is not M or F")
    return s


def check_patient_id(value: str, where: str) -> str:
    s = str(value).strip()
    if not _ID_RE.match(s) or ".." in s:
        raise LymphError(
            f"{where}, field ID: {s!r} is not a plain patient name "
            "(letters, digits, '_', '-', '.'; no path separators or '..')"
        )
    return s


# ---- files ------------------------------------------------------------------------------
def _read_csv_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Spreadsheet exports in latin-1 (sometimes behind a UTF-8 BOM): decode, drop the BOM.
        text = raw.decode("latin-1")
        text = text.removeprefix("\u00ef\u00bb\u00bf")
        log.warning("%s: not UTF-8; read as latin-1", path)
    return text.lstrip("\ufeff")


def _check_header(csv_path: Path) -> None:
    """Refuse a header naming a column twice (pandas would silently rename one) and a row
    with more fields than the header (pandas would shift it under the wrong names)."""
    import csv

    try:
        rows = csv.reader(io.StringIO(_read_csv_text(csv_path)))
        first = next(rows, [])
        names = [c.strip() for c in first]
        seen: set[str] = set()
        for k, c in enumerate(names, start=1):
            if c and c in seen:
                raise LymphError(f"{csv_path}, line 1, column {k}: duplicated column name "
                                 f"{c!r} (expected each column once)")
            seen.add(c)
        for row in rows:
            if len(row) > len(names) and any(v.strip() for v in row[len(names):]):
                raise LymphError(f"{csv_path}, line {rows.line_num}: {len(row)} fields, the "
                                 f"header names {len(names)} (a stray separator?)")
    except csv.Error as e:
        raise LymphError(f"{csv_path}: not a readable CSV ({e})") from None


def read_split_csv(csv_path: Path, split: str) -> list[Patient]:
    """Parse one split CSV into patients (without images)."""
    import pandas as pd

    if not csv_path.is_file():
        raise LymphError(f"{csv_path}: CSV file not found")
    try:
        df = pd.read_csv(
            io.StringIO(_read_csv_text(csv_path)), dtype=str, keep_default_na=False
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise LymphError(f"{csv_path}: not a readable CSV ({e})") from None
    _check_header(csv_path)
    df.columns = [str(c).strip() for c in df.columns]
    unnamed = [c for c in df.columns if c == "" or c.startswith("Unnamed:")]
    df = df.drop(columns=unnamed)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise LymphError(
            f"{csv_path}: missing required column(s) {', '.join(missing)} "
            f"(expected header {','.join(REQUIRED_COLUMNS)})"
        )
    patients: list[Patient] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(df.itertuples(index=False), start=2):  # line 1 is the header
        r = row._asdict()
        where = f"{csv_path}, line {i}"
        pid = check_patient_id(r["ID"], where)
        where = f"{csv_path}, line {i} (patient {pid})"
        if pid in seen:
            raise LymphError(f"{where}, field ID: duplicate patient id (first on line {seen[pid]})")
        seen[pid] = i
        patients.append(
            Patient(
                id=pid,
                label=parse_label(r["LABEL"], where),
                gender=parse_gender(r["GENDER"], where),
                dob=parse_dob(r["DOB"], where),
                lymph_count=parse_lymph_count(r["LYMPH_COUNT"], where),
                split=split,
            )
        )
    return patients


def _find_csv(folder: Path) -> Path:
    csvs = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
    for name in _SPLIT_CSV_PREFERENCE:
        if folder / name in csvs:
            return folder / name
    if len(csvs) == 1:
        return csvs[0]
    if not csvs:
        raise LymphError(
            f"{folder}: no CSV found (expected one CSV with columns {','.join(REQUIRED_COLUMNS)})"
        )
    raise LymphError(f"{folder}: several CSVs ({', '.join(p.name for p in csvs)}); expected one")


def list_images(folder: Path) -> list[Path]:
    """Image files of a patient folder in file-name order (hidden files ignored)."""
    import os

    with os.scandir(folder) as it:  # DirEntry.is_file() needs no extra stat call
        names = sorted(
            e.name for e in it
            if e.is_file() and not e.name.startswith(".")
            and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
        )
    return [folder / n for n in names]


def read_split_folder(folder: Path, split: str | None = None) -> list[Patient]:
    split = split or folder.name
    patients = read_split_csv(_find_csv(folder), split)
    known = {p.id for p in patients}
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in known:
            log.warning("%s: patient folder with no CSV row; ignored", entry)
    for p in patients:
        pdir = folder / p.id
        if not pdir.is_dir():
            raise LymphError(f"{folder}: patient {p.id} is in the CSV but has no image folder {pdir}")
        p.image_paths = list_images(pdir)
        if not p.image_paths:
            raise LymphError(f"{pdir}: patient {p.id} has no images (expected NNNNNN.jpg files)")
    return patients


def read_challenge(path: str | Path) -> ChallengeData:
    """Read a challenge root or a single split folder. Raises :class:`LymphError`."""
    root = Path(path)
    if not root.is_dir():
        raise LymphError(f"{root}: data folder not found")
    splits = [d for d in ("trainset", "testset") if (root / d).is_dir()]
    patients: list[Patient] = []
    if splits:
        for s in splits:
            patients += read_split_folder(root / s, s)
    else:
        patients = read_split_folder(root, root.name)
    ids: dict[str, str] = {}
    for p in patients:
        if p.id in ids:
            raise LymphError(f"{root}: patient {p.id} appears in both {ids[p.id]} and {p.split}")
        ids[p.id] = p.split
    if not patients:
        raise LymphError(f"{root}: no patients found")
    return ChallengeData(root=root, patients=patients)
