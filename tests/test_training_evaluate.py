"""`skinscan evaluate` on real HAM10000 and ISIC 2017 cuts: report keys, plots, predictions, --record."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import skinscan.bundles
from skinscan.cli import main
from skinscan.labels import CLASSES
from skinscan.model.bundle import BundleError, load_bundle, sha256_file
from training.evaluate import _tta_logits, age_band, evaluate
from training.perturb import VARIANTS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT_KEYS = (
    "balanced_accuracy", "accuracy", "macro_auc", "per_class", "melanoma", "malignant_auc", "ece",
    "ece_uncalibrated", "confusion_matrix", "n_images", "model_version", "dataset", "format", "tta",
    "melanoma_only", "subgroups",
)
MELANOMA_KEYS = ("auc", "sensitivity_at_specificity_0.80", "sensitivity_at_specificity_0.90")


@pytest.fixture()
def ham_eval(tmp_path: Path, make_ham_subset: Callable[..., Path]) -> Path:
    """A HAM10000-layout folder of 60 real images (8-9 per diagnosis) not used by the smoke training."""
    return make_ham_subset(tmp_path / "HAM10000-eval", 60, offset=150)


@pytest.fixture()
def isic2017_eval(tmp_path: Path, isic2017_dir: Path) -> Path:
    """A cut ISIC 2017 test ground truth (15 melanoma, 10 seborrheic keratoses, 15 nevi) by its images."""
    with (isic2017_dir / "ISIC-2017_Test_v2_Part3_GroundTruth.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    mel = [r for r in rows if float(r["melanoma"]) == 1][:15]
    sk = [r for r in rows if float(r["seborrheic_keratosis"]) == 1][:10]
    nv = [r for r in rows if float(r["melanoma"]) == 0 and float(r["seborrheic_keratosis"]) == 0][:15]
    folder = tmp_path / "isic2017-eval"
    folder.mkdir()
    (folder / "ISIC-2017_Test_v2_Data").symlink_to(isic2017_dir / "ISIC-2017_Test_v2_Data")
    path = folder / "ISIC-2017_Test_v2_Part3_GroundTruth.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image_id", "melanoma", "seborrheic_keratosis"])
        writer.writeheader()
        writer.writerows(mel + sk + nv)
    return path


def _check_outputs(out: Path, report: dict[str, Any], n: int) -> list[dict[str, str]]:
    """Check the report's keys and consistency, the three PNGs and the predictions CSV; return its rows."""
    for key in REPORT_KEYS:
        assert key in report, key
    for key in MELANOMA_KEYS:
        assert key in report["melanoma"], key
    assert report["n_images"] == n
    assert set(report["per_class"]) == set(CLASSES)
    for figures in report["per_class"].values():
        assert set(figures) >= {"precision", "recall", "f1", "auc", "support"}
    assert sum(f["support"] for f in report["per_class"].values()) == n
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (len(CLASSES), len(CLASSES)) and matrix.sum() == n
    assert 0.0 <= report["ece"] <= 1.0 and 0.0 <= report["ece_uncalibrated"] <= 1.0
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))  # what was returned was written

    for suffix in ("confusion", "roc", "reliability"):
        png = out.with_name(f"{out.stem}_{suffix}.png")
        assert png.read_bytes()[:8] == PNG_MAGIC, png
        with Image.open(png) as img:
            img.verify()
        with Image.open(png) as img:
            assert img.format == "PNG" and min(img.size) > 200

    with out.with_name(f"{out.stem}_predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n
    assert list(rows[0]) == ["image_id", "label", "predicted", *[f"prob_{c}" for c in CLASSES]]
    probs = np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    # "predicted" is the bundle's decision: arg-max of log-probability plus its class-prior offsets.
    offsets = np.asarray(report["decision"]["logit_offsets"])
    decided = (np.log(np.clip(probs, 1e-12, 1)) + offsets).argmax(axis=1)
    agree = np.mean([r["predicted"] == CLASSES[i] for r, i in zip(rows, decided, strict=True)])
    assert agree >= 0.95  # the CSV's six-decimal probabilities can flip a near tie
    if not offsets.any():
        assert [r["predicted"] for r in rows] == [CLASSES[i] for i in probs.argmax(axis=1)]
    assert np.mean([r["label"] == r["predicted"] for r in rows]) == pytest.approx(report["accuracy"])
    labels = [CLASSES.index(r["label"]) for r in rows]
    assert np.bincount(labels, minlength=len(CLASSES)).tolist() == matrix.sum(axis=1).tolist()
    return rows


def test_evaluate_ham10000_and_record(smoke_bundle: Path, ham_eval: Path, tmp_path: Path,
                                      ham_rows: list[dict[str, str]]) -> None:
    weights_sha = sha256_file(smoke_bundle / "weights.pt")
    before = json.loads((smoke_bundle / "metadata.json").read_text())
    out = tmp_path / "reports" / "ham.json"
    code = main(["evaluate", "--model", str(smoke_bundle), "--data", str(ham_eval), "--out", str(out),
                 "--backend", "onnx", "--threads", "1", "--record", "--name", "ham-mini"])
    assert code == 0
    report = json.loads(out.read_text())
    rows = _check_outputs(out, report, 60)
    assert report["model_version"] == "smoke-test"
    assert report["format"] == "ham10000" and report["dataset"] == "HAM10000-eval"
    assert report["melanoma_only"] is False and report["tta"] is False and report["backend"] == "onnx"
    assert report["headline"]["metric"] == "balanced_accuracy"
    assert all(report["per_class"][c]["support"] in (8, 9) for c in CLASSES)
    assert all(report["per_class"][c]["auc"] is not None for c in CLASSES)
    assert report["melanoma"]["auc"] is not None and report["macro_auc"] is not None

    # Subgroups: sex, age band and body site, each partitioning the 60 images, with per-class recall.
    truth = {r["image_id"]: r for r in ham_rows}
    subgroups = report["subgroups"]
    assert set(subgroups) == {"sex", "age_band", "body_site"}
    for attribute, groups in subgroups.items():
        assert sum(g["n"] for g in groups.values()) == 60, attribute
        for group in groups.values():
            assert sum(group["support"].values()) == group["n"]
            assert all(0.0 <= r <= 1.0 for r in group["recall"].values())
    sexes = [truth[r["image_id"]]["sex"] for r in rows]
    assert subgroups["sex"]["male"]["n"] == sexes.count("male")
    assert set(subgroups["age_band"]) <= {"<30", "30-44", "45-59", "60-74", "75+", "unknown"}
    sites = [truth[r["image_id"]]["localization"] for r in rows]
    site = max(set(sites) - {"unknown"}, key=sites.count)
    mel_at_site = [r for r in rows if truth[r["image_id"]]["localization"] == site and r["label"] == "mel"]
    if mel_at_site:
        expected = np.mean([r["predicted"] == "mel" for r in mel_at_site])
        assert subgroups["body_site"][site]["recall"]["mel"] == pytest.approx(expected)

    # --record wrote a summary into metadata.json; weights and their checksums are untouched.
    bundle = load_bundle(smoke_bundle)  # verifies the checksums
    assert sha256_file(smoke_bundle / "weights.pt") == weights_sha
    assert bundle.meta["checksums"] == before["checksums"]
    assert bundle.meta["metrics"]["validation"] == before["metrics"]["validation"]
    recorded = bundle.meta["metrics"]["evaluations"]["ham-mini"]
    assert recorded["n_images"] == 60 and recorded["dataset"] == "HAM10000-eval"
    assert recorded["balanced_accuracy"] == pytest.approx(report["balanced_accuracy"])
    assert recorded["melanoma_auc"] == pytest.approx(report["melanoma"]["auc"])
    assert recorded["ece"] == pytest.approx(report["ece"])


def test_evaluate_isic2017_melanoma_only_with_tta(smoke_bundle: Path, isic2017_eval: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "isic2017.json"
    code = main(["evaluate", "--model", str(smoke_bundle), "--data", str(isic2017_eval), "--out", str(out),
                 "--tta", "--backend", "torch", "--batch-size", "16", "--threads", "1", "--record"])
    assert code == 0
    report = json.loads(out.read_text())
    _check_outputs(out, report, 40)
    assert report["format"] == "isic2017" and report["melanoma_only"] is True
    assert set(report["known_labels"]) == {"mel", "bkl", "nv"}
    assert report["tta"] is True and report["backend"] == "torch"
    assert report["headline"] == {"metric": "melanoma_auc", "value": report["melanoma"]["auc"]}
    assert report["melanoma"]["auc"] is not None
    assert {c: report["per_class"][c]["support"] for c in ("mel", "bkl", "nv")} == {"mel": 15, "bkl": 10,
                                                                                      "nv": 15}
    # Without --name the evaluation is recorded under the dataset's name.
    meta = load_bundle(smoke_bundle).meta
    assert meta["metrics"]["evaluations"]["ISIC-2017_Test_v2_Part3_GroundTruth"]["melanoma_only"] is True


def test_evaluate_folder_per_class_lacking_classes(smoke_bundle: Path, tmp_path: Path, ham_dir: Path,
                                                  pick_ham: Callable[..., list[dict[str, str]]]) -> None:
    """A clinic's set with one folder per class and no vascular lesion or dermatofibroma: multiclass figures over
    the five classes it holds (not "melanoma only")."""
    rows = [r for r in pick_ham(70, offset=300) if r["dx"] not in ("vasc", "df")]
    root = tmp_path / "clinic"
    for row in rows:
        folder = root / {"mel": "melanoma", "nv": "nevus"}.get(row["dx"], row["dx"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{row['image_id']}.jpg").symlink_to(ham_dir / "images" / f"{row['image_id']}.jpg")
    report = evaluate(smoke_bundle, root, tmp_path / "clinic.json", backend="onnx", threads=1)
    assert report["format"] == "folders" and report["melanoma_only"] is False
    assert report["headline"]["metric"] == "balanced_accuracy"
    present = ["akiec", "bcc", "bkl", "mel", "nv"]
    assert set(report["known_labels"]) == set(present)
    recalls = [report["per_class"][c]["recall"] for c in present]
    assert report["balanced_accuracy"] == pytest.approx(float(np.mean(recalls)))
    assert report["per_class"]["vasc"]["support"] == 0 and report["per_class"]["vasc"]["auc"] is None
    assert report["macro_auc"] is not None
    # The referral flag's figures at the bundle's default point and each operating point.
    referral = report["referral"]
    flagged_default = referral["default"]
    assert 0.0 <= flagged_default["flag_rate"] <= flagged_default["flag_rate_with_uncertain"] <= 1.0
    assert referral["n_malignant"] == sum(report["per_class"][c]["support"] for c in ("akiec", "bcc", "mel"))
    rates = [p["flag_rate"] for p in referral["operating_points"]]
    assert rates == sorted(rates)  # a higher target sensitivity never flags fewer images


def _probabilities(path: Path) -> dict[str, list[float]]:
    with path.open(newline="") as fh:
        return {r["image_id"]: [float(r[f"prob_{c}"]) for c in CLASSES] for r in csv.DictReader(fh)}


def test_backends_batches_and_tta(smoke_bundle: Path, ham_eval: Path, tmp_path: Path) -> None:
    onnx = evaluate(smoke_bundle, ham_eval, tmp_path / "onnx.json", backend="onnx", batch_size=7, threads=1)
    eager = evaluate(smoke_bundle, ham_eval, tmp_path / "torch.json", backend="torch", batch_size=64,
                     threads=1)
    tta = evaluate(smoke_bundle, ham_eval, tmp_path / "tta.json", backend="onnx", tta=True, threads=1)
    assert onnx["backend"] == "onnx" and eager["backend"] == "torch"
    probs = {name: _probabilities(tmp_path / f"{name}_predictions.csv") for name in ("onnx", "torch", "tta")}
    # Same images in the same order, same probabilities whatever the backend and batch size ...
    assert list(probs["onnx"]) == list(probs["torch"]) == list(probs["tta"])
    onnx_p, torch_p = np.array(list(probs["onnx"].values())), np.array(list(probs["torch"].values()))
    assert np.abs(onnx_p - torch_p).max() < 1e-4
    assert onnx["ece"] == pytest.approx(eager["ece"], abs=1e-3)
    # ... while test-time augmentation does change them.
    assert np.abs(np.array(list(probs["tta"].values())) - onnx_p).max() > 1e-6
    assert tta["tta"] is True and onnx["tta"] is False
    assert "evaluations" not in load_bundle(smoke_bundle).meta["metrics"]  # not recorded without record=True


def test_undecodable_images_are_skipped_and_reported(smoke_bundle: Path, tmp_path: Path,
                                                     make_ham_subset: Callable[..., Path]) -> None:
    data = make_ham_subset(tmp_path / "HAM10000", 14, offset=150)
    broken = sorted((data / "images").iterdir())[5]
    content = broken.read_bytes()
    broken.unlink()
    broken.write_bytes(content[: len(content) // 3])  # a truncated JPEG
    report = evaluate(smoke_bundle, data, tmp_path / "r.json", backend="onnx")
    assert report["n_images"] == 13 and report["n_labelled"] == 14 and report["n_skipped"] == 1
    assert report["skipped"][0]["image_id"] == broken.stem
    assert "truncated" in report["skipped"][0]["reason"]
    with (tmp_path / "r_predictions.csv").open(newline="") as fh:
        assert broken.stem not in {row["image_id"] for row in csv.DictReader(fh)}


class _TopRow:
    """A stand-in predictor whose 'logits' are the first image row of channel 0, so flips change them."""

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        return batch[:, 0, 0, :].copy()


def test_tta_averages_four_flips() -> None:
    batch = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    plain = _tta_logits(_TopRow(), batch, tta=False)  # type: ignore[arg-type]
    np.testing.assert_array_equal(plain, batch[:, 0, 0, :])
    flipped = _tta_logits(_TopRow(), batch, tta=True)  # type: ignore[arg-type]
    expected = np.mean([batch[:, 0, 0, :], batch[:, 0, 0, ::-1], batch[:, 0, -1, :], batch[:, 0, -1, ::-1]],
                       axis=0)
    np.testing.assert_allclose(flipped, expected)


def test_age_bands() -> None:
    assert age_band({"age": "29.0"}) == "<30"
    assert age_band({"age": "30"}) == "30-44"
    assert age_band({"age": "59.9"}) == "45-59"
    assert age_band({"age": "60.0"}) == "60-74"
    assert age_band({"age": "85"}) == "75+"
    assert age_band({"age_approximate": "45"}) == "45-59"
    assert age_band({"age": "unknown"}) is None
    assert age_band({"age": ""}) is None
    assert age_band({}) is None


def test_default_bundle(smoke_bundle: Path, ham_eval: Path, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(skinscan.bundles, "DEFAULT_BUNDLE_DIR", tmp_path / "not-installed")
    with pytest.raises(BundleError, match="no default model bundle is installed"):
        skinscan.bundles.default_bundle_path()
    with pytest.raises(BundleError, match="no default model bundle is installed"):
        main(["evaluate", "--data", str(ham_eval), "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()

    monkeypatch.setattr(skinscan.bundles, "DEFAULT_BUNDLE_DIR", smoke_bundle)
    assert skinscan.bundles.default_bundle_path() == smoke_bundle
    assert main(["evaluate", "--data", str(ham_eval), "--out", str(tmp_path / "default.json")]) == 0
    assert json.loads((tmp_path / "default.json").read_text())["model_version"] == "smoke-test"


def test_packaged_default_location() -> None:
    path = Path(skinscan.bundles.__file__).parent / "default"
    assert skinscan.bundles.DEFAULT_BUNDLE_DIR == path
    if (path / "metadata.json").is_file():
        assert skinscan.bundles.default_bundle_path() == path
    else:
        with pytest.raises(BundleError, match=str(path)):
            skinscan.bundles.default_bundle_path()


def test_split_file_limits_evaluation_to_one_split(smoke_bundle: Path, ham_eval: Path, tmp_path: Path) -> None:
    """--split-file/--split evaluate only the images a training run put in that split."""
    ids = sorted(p.stem for p in (ham_eval / "images").glob("*.jpg"))
    split_csv = tmp_path / "splits.csv"
    with split_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "lesion_id", "group", "label", "split"])
        for i, image_id in enumerate(ids):
            writer.writerow([image_id, image_id, image_id, "nv", "test" if i % 3 == 0 else "train"])
    report = evaluate(smoke_bundle, ham_eval, tmp_path / "r.json", split_file=split_csv, split="test")
    assert report["n_images"] == len(ids[::3])
    with pytest.raises(Exception, match="no image"):
        evaluate(smoke_bundle, ham_eval, tmp_path / "r2.json", split_file=split_csv, split="val")


def test_evaluate_with_perturb_reports_every_variant(smoke_bundle: Path, ham_eval: Path, tmp_path: Path) -> None:
    """`--perturb`: the same images under each robustness variant, with balanced accuracy (decision rule and plain
    arg-max), melanoma AUC and predicted class counts beside the true ones, and a plot."""
    out = tmp_path / "robust.json"
    code = main(["evaluate", "--model", str(smoke_bundle), "--data", str(ham_eval), "--out", str(out),
                 "--backend", "onnx", "--threads", "1", "--perturb"])
    assert code == 0
    report = json.loads(out.read_text())
    robustness = report["robustness"]
    assert list(robustness) == list(VARIANTS)
    clean = robustness["clean"]
    assert clean["balanced_accuracy"] == pytest.approx(report["balanced_accuracy"])
    assert clean["balanced_accuracy_plain"] == pytest.approx(report["plain_argmax"]["balanced_accuracy"])
    for name, row in robustness.items():
        assert row["true_counts"] == clean["true_counts"], name
        assert sum(row["predicted_counts"].values()) == 60, name
        assert 0.0 <= row["balanced_accuracy"] <= 1.0 and row["melanoma_auc"] is not None, name
        assert row["balanced_accuracy_change"] == pytest.approx(row["balanced_accuracy"] - clean["balanced_accuracy"])
        assert row["melanoma_calls_ratio"] == pytest.approx(row["predicted_counts"]["mel"] / row["true_counts"]["mel"])
    # The perturbations change what the network sees: not every variant gives the clean figures.
    assert len({round(r["melanoma_auc"], 6) for r in robustness.values()}) > 3
    png = out.with_name("robust_robustness.png")
    assert report["files"]["robustness"] == png.name and png.read_bytes()[:8] == PNG_MAGIC
