"""Dataset readers: HAM10000, ISIC 2017 Part 3, ISIC 2018/2019 one-hot, and one folder per class."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

from skinscan.labels import CLASSES, FOLDER_ALIASES, GroundTruth, LabelFileError, parse_ground_truth

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A folder or file that no reader understands, or that is missing images."""


@dataclass
class Sample:
    """One labelled image: where it is, its diagnosis, the lesion it shows, and what else is known."""

    image_id: str
    path: Path
    label: str
    lesion_id: str
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class Dataset:
    """Samples read from one source, with the format and the labels that source can tell apart."""

    name: str
    format: str
    samples: list[Sample]
    known_labels: tuple[str, ...]

    @property
    def melanoma_only(self) -> bool:
        """True when the labels only separate melanoma (and keratosis) from "anything else" (ISIC 2017), so
        multiclass figures would be meaningless. A set whose every label names its class (HAM10000, ISIC
        2018/2019, one folder per class) gets multiclass figures over the classes it holds, even if some are
        missing."""
        return self.format == "isic2017"


def _index_images(root: Path) -> dict[str, Path]:
    """Map image id (file stem) to path for every image below root."""
    index: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            index.setdefault(path.stem, path)
    return index


# Side files that carry lesion ids and other metadata per image, by (lower-case) name: HAM10000_metadata.csv,
# ISIC 2017's ISIC-2017_*_Data_metadata.csv and ISIC 2019's ISIC_2019_Training_Metadata.csv (in the images folder
# or next to the ground truth), and ISIC 2018 Task 3's ISIC2018_Task3_Training_LesionGroupings.csv.
METADATA_NAME_PARTS = ("metadata", "lesiongroupings")


def _is_metadata_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".csv") and any(part in name for part in METADATA_NAME_PARTS)


def _read_csv_meta(path: Path) -> dict[str, dict[str, str]]:
    """Read a metadata CSV as image id -> its other columns; images keyed by `image_id` (HAM10000, ISIC 2017) or
    `image` (ISIC 2018/2019)."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in reader.fieldnames or []]
        key = next((k for k in ("image_id", "image") if k in fields), None)
        if key is None:
            raise KeyError(f"{path.name}: no image_id or image column")
        reader.fieldnames = fields
        return {row[key].strip(): {k: (v or "").strip() for k, v in row.items() if k != key and k is not None}
                for row in reader if row.get(key)}


def _metadata_files(csv_path: Path, image_root: Path) -> list[Path]:
    """Metadata CSVs of a ground-truth file: below its images folder, and beside the ground truth itself."""
    found = [p for p in sorted(image_root.rglob("*.csv")) if _is_metadata_name(p)]
    if csv_path.parent.resolve() != image_root.resolve():
        found += [p for p in sorted(csv_path.parent.glob("*.csv")) if _is_metadata_name(p)]
    return [p for p in dict.fromkeys(found) if p.resolve() != csv_path.resolve()]


def _from_ground_truth(csv_path: Path, image_root: Path, name: str) -> Dataset:
    try:
        truth: GroundTruth = parse_ground_truth(csv_path.read_text(encoding="utf-8-sig"))
    except LabelFileError as exc:
        raise DatasetError(f"{csv_path}: {exc}") from exc
    index = _index_images(image_root)
    meta: dict[str, dict[str, str]] = {}
    for meta_csv in _metadata_files(csv_path, image_root):
        try:
            rows = _read_csv_meta(meta_csv)
        except (KeyError, csv.Error, UnicodeDecodeError) as exc:
            log.warning("ignoring unreadable metadata file %s (%s)", meta_csv, exc)
            continue
        for image_id, row in rows.items():
            merged = meta.setdefault(image_id, {})
            merged.update({k: v for k, v in row.items() if v or k not in merged})  # no blank over a value
    samples: list[Sample] = []
    missing = [i for i in truth.labels if i not in index]
    if missing:
        raise DatasetError(
            f"{csv_path}: {len(missing)} labelled images not found under {image_root} (first: {missing[0]})"
        )
    for image_id, label in truth.labels.items():
        extra = dict(truth.extra.get(image_id, {}))
        extra.update(meta.get(image_id, {}))
        lesion = extra.pop("lesion_id", "") or image_id
        samples.append(Sample(image_id, index[image_id], label, lesion, extra))
    return Dataset(name=name, format=truth.format, samples=samples, known_labels=truth.known_labels)


def _ground_truth_csvs(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.glob("*.csv")):
        if _is_metadata_name(path) and path.name != "HAM10000_metadata.csv":
            continue
        with path.open(encoding="utf-8-sig") as fh:
            columns = {c.strip() for c in fh.readline().split(",")}
        if ("image_id" in columns and ("dx" in columns or "melanoma" in columns)) or (
                "image" in columns and "MEL" in columns):
            found.append(path)
    return found


def _images_for(csv_path: Path) -> Path:
    """Return the folder that holds a ground-truth CSV's images (the official name, else its folder)."""
    stem = csv_path.stem
    for suffix in ("_Part3_GroundTruth", "_GroundTruth"):
        if stem.endswith(suffix):
            base = stem[: -len(suffix)]
            for candidate in (base + "_Data", base + "_Input", base):
                if (csv_path.parent / candidate).is_dir():
                    return csv_path.parent / candidate
    return csv_path.parent


def _folder_per_class(folder: Path) -> Dataset | None:
    subdirs = [d for d in sorted(folder.iterdir()) if d.is_dir()]
    mapped = {d: FOLDER_ALIASES.get(d.name.lower().replace(" ", "_").replace("-", "_")) for d in subdirs}
    if not subdirs or any(label is None for label in mapped.values()):
        return None
    samples = []
    for d, label in mapped.items():
        for image_id, path in _index_images(d).items():
            samples.append(Sample(image_id, path, label, image_id))
    if not samples:
        return None
    known = tuple(c for c in CLASSES if c in set(mapped.values()))
    return Dataset(name=folder.name, format="folders", samples=samples, known_labels=known)


def read_dataset(path: str | Path) -> Dataset:
    """Read a dataset from a folder or a ground-truth CSV, picking the reader from what it holds."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(f"{path} is not a CSV ground-truth file")
        return _from_ground_truth(path, _images_for(path), path.stem)
    csvs = _ground_truth_csvs(path)
    if len(csvs) == 1:
        csv_path = csvs[0]
        root = path if csv_path.name == "HAM10000_metadata.csv" else _images_for(csv_path)
        return _from_ground_truth(csv_path, root, path.name)
    if len(csvs) > 1:
        names = ", ".join(p.name for p in csvs)
        raise DatasetError(f"{path} holds several ground-truth files ({names}); pass the one to use")
    by_folder = _folder_per_class(path)
    if by_folder is not None:
        return by_folder
    raise DatasetError(
        f"{path}: no HAM10000_metadata.csv, ISIC ground-truth CSV or one-folder-per-class layout found"
    )
