"""The one label space SkinScan predicts in, and explicit mappings from other datasets into it."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

# HAM10000's seven diagnoses, in the order every model head uses.
CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
MALIGNANT: frozenset[str] = frozenset({"mel", "bcc", "akiec"})
CLASS_NAMES: dict[str, str] = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}

# ISIC 2018 (Task 3) and 2019 one-hot columns. SCC has no class of its own in HAM10000's space; HAM10000's
# akiec already holds intraepithelial carcinoma (Bowen's disease), so squamous cell carcinoma maps there.
# UNK means "none of the others" and is left unlabelled.
ISIC_ONEHOT: dict[str, str | None] = {
    "MEL": "mel",
    "NV": "nv",
    "BCC": "bcc",
    "AKIEC": "akiec",
    "AK": "akiec",
    "SCC": "akiec",
    "BKL": "bkl",
    "DF": "df",
    "VASC": "vasc",
    "UNK": None,
}

# Folder names accepted for the one-folder-per-class layout.
FOLDER_ALIASES: dict[str, str] = {
    **{c: c for c in CLASSES},
    "melanoma": "mel",
    "nevus": "nv",
    "naevus": "nv",
    "nevi": "nv",
    "melanocytic_nevus": "nv",
    "basal_cell_carcinoma": "bcc",
    "actinic_keratosis": "akiec",
    "ak": "akiec",
    "scc": "akiec",
    "seborrheic_keratosis": "bkl",
    "benign_keratosis": "bkl",
    "dermatofibroma": "df",
    "vascular": "vasc",
    "vascular_lesion": "vasc",
}


# --- ground-truth files -------------------------------------------------------------------------------------

class LabelFileError(ValueError):
    """A ground-truth CSV that cannot be read; carries the 1-based line number where it went wrong."""

    def __init__(self, message: str, line: int | None = None) -> None:
        self.line = line
        self.reason = message  # without the line number (a detail that names the line itself)
        super().__init__(f"line {line}: {message}" if line else message)


@dataclass
class GroundTruth:
    """Labels read from a ground-truth CSV: image id -> label, plus what the file can tell apart."""

    format: str
    labels: dict[str, str]
    known_labels: tuple[str, ...]
    extra: dict[str, dict[str, str]] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)


def _flag(value: str, line: int, column: str) -> bool:
    try:
        number = float(value)
    except ValueError:
        raise LabelFileError(f"column {column!r} must be 0 or 1, got {value!r}", line) from None
    if number not in (0.0, 1.0):
        raise LabelFileError(f"column {column!r} must be 0 or 1, got {value!r}", line)
    return number == 1.0


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def image_id_of(name: str) -> str:
    """Return the image id a file name stands for (its base name without extension)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def parse_ground_truth(text: str) -> GroundTruth:
    """Parse HAM10000 metadata, ISIC 2017 Part 3 or ISIC 2018/2019 one-hot ground truth from CSV text."""
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise LabelFileError("the labels file is empty", 1) from None
    except csv.Error as exc:
        raise LabelFileError(f"not a CSV file: {exc}", 1) from None
    cols = {h: i for i, h in enumerate(header)}
    if len(header) == 1 and header[0].count(";") >= 1:
        raise LabelFileError(
            "the columns are separated by ';' (a spreadsheet's CSV export in some languages); save the file as CSV "
            "with ',' between columns", 1)
    if "image_id" in cols and "dx" in cols:
        fmt, known = "ham10000", CLASSES
    elif "image_id" in cols and "melanoma" in cols and "seborrheic_keratosis" in cols:
        fmt, known = "isic2017", ("mel", "bkl", "nv")
    elif "image" in cols and "MEL" in cols and all(h in ISIC_ONEHOT for h in header if h != "image"):
        fmt = "isic_onehot"
        known = tuple(c for c in CLASSES if any(ISIC_ONEHOT[h] == c for h in header if h != "image"))
    else:
        raise LabelFileError(
            "unrecognised columns "
            f"{_shorten(','.join(header))!r}; expected HAM10000 metadata (image_id,dx,...), ISIC 2017 Part 3 "
            "(image_id,melanoma,seborrheic_keratosis) or ISIC 2018/2019 (image,MEL,NV,BCC,...)",
            1,
        )
    labels: dict[str, str] = {}
    extra: dict[str, dict[str, str]] = {}
    lines: dict[str, int] = {}
    seen: dict[str, int] = {}
    try:
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise LabelFileError(f"expected {len(header)} columns, found {len(row)}", lineno)
            row = [c.strip() for c in row]
            image_id = row[cols["image" if fmt == "isic_onehot" else "image_id"]]
            if not image_id:
                raise LabelFileError("empty image id", lineno)
            if image_id in seen:
                raise LabelFileError(f"image {image_id!r} is listed twice (first on line {seen[image_id]})", lineno)
            seen[image_id] = lineno
            label: str | None
            if fmt == "ham10000":
                label = row[cols["dx"]].lower()
                if label not in CLASSES:
                    raise LabelFileError(f"unknown diagnosis {label!r}; expected one of {', '.join(CLASSES)}",
                                         lineno)
                extra[image_id] = {h: row[i] for h, i in cols.items() if h not in ("image_id", "dx")}
            elif fmt == "isic2017":
                mel = _flag(row[cols["melanoma"]], lineno, "melanoma")
                sk = _flag(row[cols["seborrheic_keratosis"]], lineno, "seborrheic_keratosis")
                if mel and sk:
                    raise LabelFileError("melanoma and seborrheic_keratosis cannot both be 1", lineno)
                label = "mel" if mel else "bkl" if sk else "nv"
            else:
                hot = [h for h in header if h != "image" and _flag(row[cols[h]], lineno, h)]
                if len(hot) != 1:
                    raise LabelFileError(f"exactly one class column must be 1, found {len(hot)}", lineno)
                label = ISIC_ONEHOT[hot[0]]
                if label is None:
                    continue
            labels[image_id] = label
            lines[image_id] = lineno
    except csv.Error as exc:
        raise LabelFileError(f"not a valid CSV file: {exc}", reader.line_num) from None
    if not labels:
        raise LabelFileError("the labels file has no labelled rows", 2)
    return GroundTruth(format=fmt, labels=labels, known_labels=known, extra=extra, lines=lines)


@dataclass
class LabelMatch:
    """The rows of a ground-truth file matched to the images of a batch (the file may cover many more)."""

    labels: dict[str, str]  # image id of an uploaded file -> its true label
    unmatched_rows: int  # labelled rows whose image is not in the batch (ignored)
    unlabelled: int  # image ids of the batch without a labelled row

    def summary(self) -> str:
        """One sentence on what matched: '5 images labelled; 10,010 label rows matched no uploaded image.'"""
        n = len(self.labels)
        parts = [f"{n:,} image{'' if n == 1 else 's'} labelled"]
        if self.unlabelled:
            parts.append(f"{self.unlabelled:,} without a label row")
        text = ", ".join(parts)
        if self.unmatched_rows:
            rows = "row" if self.unmatched_rows == 1 else "rows"
            text += f"; {self.unmatched_rows:,} label {rows} matched no uploaded image"
        return text + "."


def match_labels(truth: GroundTruth, image_ids: list[str] | set[str]) -> LabelMatch:
    """Match a ground-truth file's rows to a batch's image ids: exact id first, else the same id in any case.

    Rows for images not in the batch are counted and ignored; images without a row stay unlabelled.
    """
    exact = set(image_ids)
    folded: dict[str, str] = {}
    for image_id in sorted(exact):
        folded.setdefault(image_id.casefold(), image_id)
    labels = {row_id: label for row_id, label in truth.labels.items() if row_id in exact}
    unmatched = 0
    for row_id, label in truth.labels.items():
        if row_id in exact:
            continue
        target = folded.get(row_id.casefold())
        if target is None or target in labels:
            unmatched += 1
        else:
            labels[target] = label
    return LabelMatch(labels=labels, unmatched_rows=unmatched, unlabelled=len(exact) - len(labels))
