"""`skinscan train` smoke test on 150 real HAM10000 images (run folder, bundle, resume); local weights."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from skinscan.cli import main
from skinscan.labels import CLASSES
from skinscan.model.bundle import BundleError, load_bundle
from training.config import TrainConfig
from training.export import create_model
from training.rundata import prepare
from training.splits import read_splits

BUNDLE_KEYS = (
    "architecture", "classes", "input_size", "resize_size", "mean", "std", "temperature", "version",
    "checksums",
)


def _history(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]


def test_run_folder(smoke_run: Path) -> None:
    for name in ("args.json", "splits.csv", "train.log", "history.jsonl", "checkpoints/last.pt",
                 "checkpoints/best.pt", "bundle/metadata.json", "bundle/weights.pt", "bundle/model.onnx"):
        assert (smoke_run / name).is_file(), name
    args = json.loads((smoke_run / "args.json").read_text())
    assert args["arch"] == "tf_efficientnet_lite0" and args["input_size"] == 64 and args["epochs"] == 1
    assert args["pretrained"] == "imagenet" and args["colour_constancy"] == "shades_of_gray"
    assert "dataset" in (smoke_run / "train.log").read_text()  # the run's log captured the run

    with (smoke_run / "splits.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 150
    splits_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        splits_of[row["lesion_id"]].add(row["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    assert {r["split"] for r in rows} == {"train", "val", "test"}

    history = _history(smoke_run)
    assert [h["epoch"] for h in history] == [1]
    assert 0.0 <= history[0]["val_balanced_accuracy"] <= 1.0

    bundle = load_bundle(smoke_run / "bundle")
    for key in BUNDLE_KEYS:
        assert key in bundle.meta, key
    assert bundle.meta["architecture"] == "tf_efficientnet_lite0"
    assert bundle.meta["initialisation"].startswith("ImageNet")
    assert bundle.meta["mean"] == [0.5, 0.5, 0.5] and bundle.meta["std"] == [0.5, 0.5, 0.5]  # the weights' own
    assert bundle.meta["colour_constancy"] == {"method": "shades_of_gray", "power": 6.0}
    assert bundle.malignant_classes == ["akiec", "bcc", "mel"]
    points = bundle.meta["referral"]["operating_points"]
    assert [p["target_sensitivity"] for p in points] == [0.8, 0.85, 0.9, 0.92, 0.95, 0.98]
    assert all(p["sensitivity"] >= p["target_sensitivity"] for p in points)
    assert bundle.referral_threshold() == bundle.referral_threshold(0.90)
    counts = bundle.meta["training_data"]["counts"]
    assert sum(counts[bundle.meta["training_data"]["dataset"]].values()) == 150
    # Model choice: mean balanced accuracy over the validation split and its robustness variants.
    variants = {k: v for k, v in history[0].items() if k.startswith("val_balanced_accuracy[")}
    assert len(variants) == 10
    assert history[0]["val_score"] == pytest.approx(np.mean([history[0]["val_balanced_accuracy"],
                                                             *variants.values()]))
    assert bundle.meta["resize_mode"] == "squash" and len(bundle.meta["decision"]["logit_offsets"]) == 7
    assert bundle.classes == list(CLASSES)
    assert bundle.input_size == 64 and bundle.resize_size >= 64
    assert len(bundle.meta["mean"]) == 3 and len(bundle.meta["std"]) == 3
    assert all(0.0 < m < 1.0 for m in bundle.meta["mean"]) and all(0.0 < s < 1.0 for s in bundle.meta["std"])
    assert bundle.temperature > 0
    assert bundle.version == "smoke-test"
    # The heat-map head travels with a global-pool + linear network (the ONNX file then has a features output).
    assert set(bundle.meta["checksums"]) - {"heatmap_head.npz"} == {"weights.pt", "model.onnx"}
    assert (smoke_run / "bundle" / "splits.csv").read_text() == (smoke_run / "splits.csv").read_text()


def test_resume(smoke_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    first = _history(run)
    splits_before = (run / "splits.csv").read_text()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.setLevel(logging.INFO)
    try:
        # --data, --arch and the rest come from the run's args.json; only --epochs changes.
        assert main(["train", "--data", "unused", "--out", str(run), "--epochs", "2", "--resume"]) == 0
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
    history = _history(run)
    assert [h["epoch"] for h in history] == [1, 2]  # continued from epoch 2, did not start over
    assert history[0] == first[0]
    assert (run / "splits.csv").read_text() == splits_before
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and len(state["history"]) == 2
    bundle = load_bundle(run / "bundle")
    assert len(bundle.meta["training"]["history"]) == 2
    assert bundle.meta["training"]["epochs"] == 2
    assert "resumed from epoch" in (run / "train.log").read_text()
    assert json.loads((run / "args.json").read_text())["out"] == str(run)


def test_pretrained_local_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = torchvision.models.get_model("mobilenet_v3_small", weights=None)  # 1000-class ImageNet head
    saved = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / "mobilenet_v3_small-imagenet.pth"
    torch.save(saved, path)

    model = create_model("mobilenet_v3_small", len(CLASSES), path)
    state = model.state_dict()
    assert torch.equal(state["features.0.0.weight"], saved["features.0.0.weight"])
    assert torch.equal(state["features.12.0.weight"], saved["features.12.0.weight"])
    assert torch.equal(state["classifier.0.weight"], saved["classifier.0.weight"])
    head = model.classifier[-1]
    assert isinstance(head, torch.nn.Linear) and head.out_features == len(CLASSES)
    assert saved["classifier.3.weight"].shape[0] == 1000
    # A fresh model of the same architecture has other weights: the file was really loaded.
    fresh = create_model("mobilenet_v3_small", len(CLASSES)).state_dict()
    assert not torch.equal(fresh["features.0.0.weight"], saved["features.0.0.weight"])

    # A checkpoint wrapped as {"state_dict": ...} loads too; one of another architecture is refused.
    torch.save({"state_dict": saved}, tmp_path / "wrapped.pth")
    wrapped = create_model("mobilenet_v3_small", len(CLASSES), tmp_path / "wrapped.pth")
    assert torch.equal(wrapped.state_dict()["features.0.0.weight"], saved["features.0.0.weight"])
    with pytest.raises(BundleError, match="does not fit regnet_y_400mf"):
        create_model("regnet_y_400mf", len(CLASSES), path)


def test_extra_training_sets_never_touch_held_out_images(
    tmp_path: Path, make_ham_subset: Callable[..., Path], isic2017_dir: Path
) -> None:
    """Another collection joins training only; its duplicates of held-out or validation/test images do not."""
    ham = make_ham_subset(tmp_path / "ham", 40)
    ham_ids = sorted(p.stem for p in (ham / "images").iterdir())
    split_file = tmp_path / "given-splits.csv"
    given = {image_id: ("test" if i % 4 == 0 else "val" if i % 4 == 1 else "train")
             for i, image_id in enumerate(ham_ids)}
    with split_file.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "lesion_id", "group", "label", "split"])
        writer.writerows([image_id, image_id, image_id, "nv", sp] for image_id, sp in given.items())
    # A folder-per-class set holding a renamed copy of a HAM10000 test image and of a training image.
    extra_folders = tmp_path / "clinic"
    (extra_folders / "nv").mkdir(parents=True)
    test_id, train_id = ham_ids[0], ham_ids[2]
    shutil.copy(ham / "images" / f"{test_id}.jpg", extra_folders / "nv" / "copy_of_test.jpg")
    shutil.copy(ham / "images" / f"{train_id}.jpg", extra_folders / "nv" / "copy_of_train.jpg")

    val_csv = isic2017_dir / "ISIC-2017_Validation_Part3_GroundTruth.csv"
    test_csv = isic2017_dir / "ISIC-2017_Test_v2_Part3_GroundTruth.csv"
    cfg = TrainConfig(data=str(ham), out=str(tmp_path / "run"), input_size=32, splits=str(split_file),
                      extra_train=[str(val_csv), str(extra_folders)], holdout=[str(test_csv)])
    (tmp_path / "run").mkdir()
    prep = prepare(cfg, tmp_path / "run")
    dataset, images, splits = prep.dataset, prep.images, prep.splits
    # Each image keeps its source's label format, so ISIC 2017's "neither" is supervised as a partial label.
    format_of = {s.image_id: f for s, f in zip(dataset.samples, prep.formats, strict=True)}
    assert format_of[ham_ids[0]] == "ham10000" and format_of["copy_of_train"] == "folders"

    split_of = {s.image_id: sp for s, sp in zip(dataset.samples, splits, strict=True)}
    assert len(images) == len(dataset.samples) == len(splits)
    assert all(split_of[i] == given[i] for i in ham_ids)  # the given split of the main set is kept
    # ISIC 2017 validation: all train, except the image the official test split duplicates (ISIC_0016002).
    with val_csv.open(newline="") as fh:
        val_ids = [row["image_id"] for row in csv.DictReader(fh)]
    assert "ISIC_0012221" not in split_of
    assert all(split_of[i] == "train" for i in val_ids if i != "ISIC_0012221")
    labels = {s.image_id: s.label for s in dataset.samples}
    assert {labels[i] for i in val_ids if i in labels} == {"mel", "bkl", "nv"}
    # The copy of a test image is kept out of training; the copy of a training image trains.
    assert split_of["copy_of_test"] == "unused" and split_of["copy_of_train"] == "train"
    written = read_splits(tmp_path / "run" / "splits.csv")
    assert written == split_of


def test_every_config_field_is_an_option_and_every_option_a_field() -> None:
    """One parser from the config: every TrainConfig field has a flag of its type and default, every flag but
    --resume is a field, and parsed flags rebuild the config."""
    import argparse
    from dataclasses import MISSING, fields

    from training.config import config_from_args
    from training.train import get_args_parser

    parser = get_args_parser()
    options = {a.dest: a for a in parser._actions if not isinstance(a, argparse._HelpAction)}
    config_fields = {f.name: f for f in fields(TrainConfig)}
    assert set(options) - {"resume"} == set(config_fields)  # no field without a flag, no flag without a field
    for name, f in config_fields.items():
        action = options[name]
        assert action.option_strings == ["--" + name.replace("_", "-")], name
        assert action.help, name
        if f.default is MISSING and f.default_factory is MISSING:
            assert action.required, name
        elif f.default_factory is list:
            assert isinstance(action, argparse._AppendAction) and action.default == [], name
        else:
            assert action.default == f.default, name
            assert action.type is {"int": int, "float": float}.get(str(f.type), str), name
    args = parser.parse_args(["--data", "d", "--out", "o", "--epochs", "3", "--lr", "0.01", "--pretrained", "none",
                              "--extra-val", "a.csv", "--extra-val", "b.csv", "--ema-decay", "0"])
    cfg = config_from_args(args)
    assert (cfg.epochs, cfg.lr, cfg.pretrained, cfg.extra_val, cfg.ema_decay) == (3, 0.01, None, ["a.csv", "b.csv"], 0)
    assert cfg.resize_size == cfg.input_size == 160
    defaults = config_from_args(parser.parse_args(["--data", "d", "--out", "o"]))
    assert defaults == TrainConfig(data="d", out="o")
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "d", "--out", "o", "--colour-constancy", "retinex"])


def test_scorer_uses_the_bundles_classes_and_the_chosen_operating_point(smoke_bundle: Path) -> None:
    from skinscan.model.scorer import Scorer

    bundle = load_bundle(smoke_bundle)
    default = Scorer(bundle, backend="onnx", batch_size=1, decode_workers=1)
    assert default.threshold == bundle.meta["referral"]["malignancy_threshold"]
    chosen = Scorer(bundle, backend="onnx", batch_size=1, decode_workers=1, referral_sensitivity=0.98)
    assert chosen.threshold == bundle.referral_threshold(0.98) <= default.threshold
    with pytest.raises(BundleError, match="no referral operating point for sensitivity 0.5"):
        Scorer(bundle, backend="onnx", batch_size=1, decode_workers=1, referral_sensitivity=0.5)
    # The malignancy score sums the classes the bundle names, not a global list.
    bundle.meta["malignant_classes"] = ["mel"]
    only_mel = Scorer(bundle, backend="onnx", batch_size=1, decode_workers=1)
    assert only_mel.malignancy({"mel": 0.2, "bcc": 0.1, "nv": 0.7}) == pytest.approx(0.2)
    assert chosen.malignancy({"mel": 0.2, "bcc": 0.1, "nv": 0.7}) == pytest.approx(0.3)
