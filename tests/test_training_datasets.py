"""Dataset readers on small real cuts of HAM10000 and ISIC 2017, in every layout users bring."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest

from skinscan.labels import CLASSES
from training.datasets import DatasetError, read_dataset

ONEHOT_2018 = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
ONEHOT_2019 = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
DX_TO_2018 = {dx: dx.upper() for dx in CLASSES}
DX_TO_2019 = DX_TO_2018 | {"akiec": "AK"}
Picker = Callable[..., list[dict[str, str]]]


def _truth(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "HAM10000_metadata.csv").open(newline="") as fh:
        return {row["image_id"]: row for row in csv.DictReader(fh)}


@pytest.mark.parametrize("layout", ["images", "parts"])
def test_ham10000_layouts(layout: str, tmp_path: Path, make_ham_subset: Callable[..., Path]) -> None:
    folder = make_ham_subset(tmp_path / "HAM10000", 21, layout=layout)
    truth = _truth(folder)
    dataset = read_dataset(folder)
    assert dataset.format == "ham10000"
    assert dataset.known_labels == CLASSES
    assert not dataset.melanoma_only
    assert len(dataset.samples) == 21
    assert {s.label for s in dataset.samples} == set(CLASSES)
    for sample in dataset.samples:
        row = truth[sample.image_id]
        assert sample.label == row["dx"]
        assert sample.lesion_id == row["lesion_id"]
        assert sample.path.is_file() and sample.path.stem == sample.image_id
        assert sample.meta["sex"] == row["sex"] and sample.meta["localization"] == row["localization"]
    if layout == "parts":
        parents = {s.path.parent.name for s in dataset.samples}
        assert parents == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    # The metadata CSV itself, passed instead of the folder, reads the same.
    by_csv = read_dataset(folder / "HAM10000_metadata.csv")
    assert {(s.image_id, s.label) for s in by_csv.samples} == {(s.image_id, s.label) for s in dataset.samples}


def _isic2017_cut(tmp_path: Path, isic2017_dir: Path, n: int = 20) -> tuple[Path, dict[str, tuple[str, str]]]:
    source = isic2017_dir / "ISIC-2017_Test_v2_Part3_GroundTruth.csv"
    with source.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    mel = [r for r in rows if float(r["melanoma"]) == 1][: n // 3]
    sk = [r for r in rows if float(r["seborrheic_keratosis"]) == 1][: n // 3]
    nv = [r for r in rows if float(r["melanoma"]) == 0 and float(r["seborrheic_keratosis"]) == 0]
    picked = mel + sk + nv[: n - len(mel) - len(sk)]
    folder = tmp_path / "isic2017"
    folder.mkdir()
    (folder / "ISIC-2017_Test_v2_Data").symlink_to(isic2017_dir / "ISIC-2017_Test_v2_Data")
    csv_path = folder / "ISIC-2017_Test_v2_Part3_GroundTruth.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image_id", "melanoma", "seborrheic_keratosis"])
        writer.writeheader()
        writer.writerows(picked)
    return csv_path, {r["image_id"]: (r["melanoma"], r["seborrheic_keratosis"]) for r in picked}


def test_isic2017_ground_truth(tmp_path: Path, isic2017_dir: Path) -> None:
    csv_path, flags = _isic2017_cut(tmp_path, isic2017_dir)
    for dataset in (read_dataset(csv_path), read_dataset(csv_path.parent)):
        assert dataset.format == "isic2017"
        assert set(dataset.known_labels) == {"mel", "bkl", "nv"}
        assert dataset.melanoma_only
        assert len(dataset.samples) == 20
        for sample in dataset.samples:
            mel, sk = flags[sample.image_id]
            expected = "mel" if float(mel) == 1 else "bkl" if float(sk) == 1 else "nv"
            assert sample.label == expected
            assert sample.path.is_file()
            assert "sex" in sample.meta and "age_approximate" in sample.meta  # from the _Data_metadata.csv
        assert {s.label for s in dataset.samples} == {"mel", "bkl", "nv"}


def test_isic2017_folder_with_all_splits_is_ambiguous(isic2017_dir: Path) -> None:
    with pytest.raises(DatasetError, match="several ground-truth files"):
        read_dataset(isic2017_dir)


def _onehot(path: Path, columns: list[str], rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", *columns])
        for image_id, column in rows:
            writer.writerow([image_id, *["1.0" if c == column else "0.0" for c in columns]])


def _link_images(folder: Path, ham_dir: Path, image_ids: list[str]) -> None:
    folder.mkdir(parents=True)
    for image_id in image_ids:
        (folder / f"{image_id}.jpg").symlink_to(ham_dir / "images" / f"{image_id}.jpg")


def test_isic2018_onehot(tmp_path: Path, ham_dir: Path, pick_ham: Picker) -> None:
    rows = pick_ham(21)
    _link_images(tmp_path / "ISIC2018_Task3_Test_Input", ham_dir, [r["image_id"] for r in rows])
    csv_path = tmp_path / "ISIC2018_Task3_Test_GroundTruth.csv"
    _onehot(csv_path, ONEHOT_2018, [(r["image_id"], DX_TO_2018[r["dx"]]) for r in rows])
    for dataset in (read_dataset(csv_path), read_dataset(tmp_path)):
        assert dataset.format == "isic_onehot"
        assert dataset.known_labels == CLASSES
        assert not dataset.melanoma_only
        assert {s.image_id: s.label for s in dataset.samples} == {r["image_id"]: r["dx"] for r in rows}
        assert all(s.path.parent.name == "ISIC2018_Task3_Test_Input" for s in dataset.samples)


def test_isic2019_onehot_scc_and_unk(tmp_path: Path, ham_dir: Path, pick_ham: Picker) -> None:
    rows = pick_ham(21)
    # Two of the three akiec images (carcinoma in situ) are marked SCC; the last two images are UNK.
    akiec = [r for r in rows if r["dx"] == "akiec"]
    assert len(akiec) == 3
    scc = [(r["image_id"], "SCC") for r in akiec[1:]]
    unk = [(r["image_id"], "UNK") for r in rows[-2:]]
    special = {image_id for image_id, _ in scc + unk}
    labelled = [(r["image_id"], DX_TO_2019[r["dx"]]) for r in rows if r["image_id"] not in special]
    assert any(column == "AK" for _, column in labelled)
    _link_images(tmp_path / "ISIC_2019_Training_Input", ham_dir, [r["image_id"] for r in rows])
    csv_path = tmp_path / "ISIC_2019_Training_GroundTruth.csv"
    _onehot(csv_path, ONEHOT_2019, labelled + scc + unk)
    dataset = read_dataset(csv_path)
    assert dataset.format == "isic_onehot"
    assert dataset.known_labels == CLASSES
    labels = {s.image_id: s.label for s in dataset.samples}
    assert len(labels) == 19
    assert set(labels.values()) == set(CLASSES)
    for image_id, column in labelled:
        assert labels[image_id] == {"AK": "akiec"}.get(column, column.lower())
    for image_id, _ in scc:
        assert labels[image_id] == "akiec"
    for image_id, _ in unk:
        assert image_id not in labels


def test_folder_per_class(tmp_path: Path, ham_dir: Path, pick_ham: Picker) -> None:
    rows = [r for r in pick_ham(35) if r["dx"] in ("mel", "nv")]
    assert len(rows) == 10
    root = tmp_path / "by-class"
    for name, dx in (("melanoma", "mel"), ("nevus", "nv")):
        _link_images(root / name, ham_dir, [r["image_id"] for r in rows if r["dx"] == dx])
    dataset = read_dataset(root)
    assert dataset.format == "folders"
    assert dataset.known_labels == ("mel", "nv")
    assert not dataset.melanoma_only  # every folder names its class: multiclass figures over the classes there
    assert {s.image_id: s.label for s in dataset.samples} == {r["image_id"]: r["dx"] for r in rows}


def test_unrecognisable_folder(tmp_path: Path) -> None:
    (tmp_path / "holiday photos").mkdir()
    (tmp_path / "notes.csv").write_text("name,value\na,1\n")
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DatasetError, match="no HAM10000_metadata.csv, ISIC ground-truth CSV"):
        read_dataset(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "absent")
    with pytest.raises(DatasetError, match="not a CSV"):
        read_dataset(tmp_path / "readme.txt")


def test_missing_images(tmp_path: Path, make_ham_subset: Callable[..., Path]) -> None:
    folder = make_ham_subset(tmp_path / "HAM10000", 14)
    gone = sorted((folder / "images").iterdir())[3]
    gone.unlink()
    with pytest.raises(DatasetError, match=rf"1 labelled images not found .*first: {gone.stem}"):
        read_dataset(folder)


def test_bad_ground_truth_is_a_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "truth.csv").write_text("image_id,melanoma,seborrheic_keratosis\nISIC_1,1,1\n")
    with pytest.raises(DatasetError, match="line 2: melanoma and seborrheic_keratosis cannot both be 1"):
        read_dataset(tmp_path / "truth.csv")
