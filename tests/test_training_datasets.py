"""Dataset readers on small real cuts of HAM10000 and ISIC 2017, in every layout users bring."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest

from skinscan.labels import CLASSES
from training.datasets import DatasetError, Sample, read_dataset

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


# --- lesion ids from every official metadata layout ------------------------------------------------------------

def _lesion_cut(ham_rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Real HAM10000 rows: three lesions of two images each (different diagnoses) and two one-image lesions."""
    by_lesion: dict[str, list[dict[str, str]]] = {}
    for row in ham_rows:
        by_lesion.setdefault(row["lesion_id"], []).append(row)
    picked: list[dict[str, str]] = []
    seen_dx: set[str] = set()
    for rows in by_lesion.values():
        if len(rows) == 2 and rows[0]["dx"] not in seen_dx and len(seen_dx) < 3:
            seen_dx.add(rows[0]["dx"])
            picked += rows
    picked += [rows[0] for rows in by_lesion.values() if len(rows) == 1][:2]
    assert len(picked) == 8
    return picked


def _renamed_images(folder: Path, ham_dir: Path, rows: list[dict[str, str]], first: int) -> dict[str, dict[str, str]]:
    """Symlink the rows' real images into folder under new ISIC-style ids; return new id -> row."""
    folder.mkdir(parents=True)
    out = {}
    for i, row in enumerate(rows):
        new_id = f"ISIC_{first + i:07d}"
        (folder / f"{new_id}.jpg").symlink_to(ham_dir / "images" / f"{row['image_id']}.jpg")
        out[new_id] = row
    return out


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _assert_lesions(dataset_samples: list[Sample], by_id: dict[str, dict[str, str]], blank: str | None = None) -> None:
    """Each sample carries its real lesion id (its own image id where the metadata leaves it blank), and images
    of one lesion land in one split group."""
    from training.splits import duplicate_groups

    assert {s.image_id for s in dataset_samples} == set(by_id)
    for s in dataset_samples:
        expected = s.image_id if s.image_id == blank else by_id[s.image_id]["lesion_id"]
        assert s.lesion_id == expected, s.image_id
    groups = duplicate_groups(dataset_samples, list(range(len(dataset_samples))))  # distinct hashes
    group_of = {s.image_id: g for s, g in zip(dataset_samples, groups, strict=True)}
    for lesion in {r["lesion_id"] for i, r in by_id.items() if i != blank}:
        members = [i for i, r in by_id.items() if r["lesion_id"] == lesion]
        assert len(members) in (1, 2) and len({group_of[i] for i in members}) == 1, lesion
    assert len(set(groups)) == len({r["lesion_id"] for r in by_id.values()})


def test_isic2019_training_metadata_gives_lesion_ids(tmp_path: Path, ham_dir: Path,
                                                     ham_rows: list[dict[str, str]]) -> None:
    """ISIC 2019's layout: ISIC_2019_Training_Metadata.csv beside the ground truth, keyed by `image`, with
    lesion_id (blank for some images). The folder is one dataset (the metadata is not a second ground truth),
    and lesion ids, age, site and sex are read, passing the folder or the ground-truth CSV."""
    by_id = _renamed_images(tmp_path / "ISIC_2019_Training_Input", ham_dir, _lesion_cut(ham_rows), 9_100_000)
    (tmp_path / "ISIC_2019_Training_Input" / "LICENSE.txt").write_text("CC-BY-NC")
    truth = _write_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", ["image", *ONEHOT_2019],
                       [[i, *["1.0" if c == DX_TO_2019[r["dx"]] else "0.0" for c in ONEHOT_2019]]
                        for i, r in by_id.items()])
    blank = list(by_id)[-1]  # a one-image lesion with no lesion id in the metadata (as many ISIC 2019 rows)
    _write_csv(tmp_path / "ISIC_2019_Training_Metadata.csv",
               ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"],
               [[i, r["age"], r["localization"], "" if i == blank else r["lesion_id"], r["sex"]]
                for i, r in by_id.items()])
    for dataset in (read_dataset(tmp_path), read_dataset(truth)):
        assert dataset.format == "isic_onehot" and len(dataset.samples) == 8
        assert {s.image_id: s.label for s in dataset.samples} == {i: r["dx"] for i, r in by_id.items()}
        _assert_lesions(dataset.samples, by_id, blank)
        for s in dataset.samples:
            row = by_id[s.image_id]
            assert s.meta["sex"] == row["sex"] and s.meta["anatom_site_general"] == row["localization"]
            assert "image" not in s.meta and "lesion_id" not in s.meta


def test_isic2017_data_metadata_gives_lesion_ids(tmp_path: Path, ham_dir: Path,
                                                 ham_rows: list[dict[str, str]]) -> None:
    """ISIC 2017's layout: ISIC-2017_*_Data_metadata.csv inside the images folder, keyed by `image_id`; a lesion_id
    column there (as ISIC archive exports carry) is read."""
    by_id = _renamed_images(tmp_path / "ISIC-2017_Training_Data", ham_dir, _lesion_cut(ham_rows), 9_200_000)
    truth = _write_csv(tmp_path / "ISIC-2017_Training_Part3_GroundTruth.csv",
                       ["image_id", "melanoma", "seborrheic_keratosis"],
                       [[i, "1.0" if r["dx"] == "mel" else "0.0", "1.0" if r["dx"] == "bkl" else "0.0"]
                        for i, r in by_id.items()])
    _write_csv(tmp_path / "ISIC-2017_Training_Data" / "ISIC-2017_Training_Data_metadata.csv",
               ["image_id", "age_approximate", "sex", "lesion_id"],
               [[i, r["age"], r["sex"], r["lesion_id"]] for i, r in by_id.items()])
    for dataset in (read_dataset(tmp_path), read_dataset(truth)):
        assert dataset.format == "isic2017"
        _assert_lesions(dataset.samples, by_id)
        assert all(s.meta["age_approximate"] == by_id[s.image_id]["age"] for s in dataset.samples)


def test_isic2018_lesion_groupings_give_lesion_ids(tmp_path: Path, ham_dir: Path,
                                                   ham_rows: list[dict[str, str]]) -> None:
    """ISIC 2018 Task 3's layout: ISIC2018_Task3_Training_LesionGroupings.csv (image, lesion_id,
    diagnosis_confirm_type) beside the one-hot ground truth."""
    by_id = _renamed_images(tmp_path / "ISIC2018_Task3_Training_Input", ham_dir, _lesion_cut(ham_rows), 9_300_000)
    _write_csv(tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv", ["image", *ONEHOT_2018],
               [[i, *["1.0" if c == DX_TO_2018[r["dx"]] else "0.0" for c in ONEHOT_2018]] for i, r in by_id.items()])
    _write_csv(tmp_path / "ISIC2018_Task3_Training_LesionGroupings.csv",
               ["image", "lesion_id", "diagnosis_confirm_type"],
               [[i, r["lesion_id"], r["dx_type"]] for i, r in by_id.items()])
    dataset = read_dataset(tmp_path)
    assert dataset.format == "isic_onehot"
    _assert_lesions(dataset.samples, by_id)
    assert {s.meta["diagnosis_confirm_type"] for s in dataset.samples} <= {"histo", "follow_up", "consensus",
                                                                             "confocal"}
