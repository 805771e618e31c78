"""`skinscan train` smoke test on 150 real HAM10000 images (run folder, bundle, resume); local weights."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torchvision

from skinscan.cli import main
from skinscan.labels import CLASSES
from training.bundle import BundleError, create_model, load_bundle

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
    assert args["arch"] == "resnet18" and args["input_size"] == 64 and args["epochs"] == 1
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
    assert bundle.meta["architecture"] == "resnet18"
    assert bundle.classes == list(CLASSES)
    assert bundle.input_size == 64 and bundle.resize_size >= 64
    assert len(bundle.meta["mean"]) == 3 and len(bundle.meta["std"]) == 3
    assert all(0.0 < m < 1.0 for m in bundle.meta["mean"]) and all(0.0 < s < 1.0 for s in bundle.meta["std"])
    assert bundle.temperature > 0
    assert bundle.version == "smoke-test"
    assert set(bundle.meta["checksums"]) == {"weights.pt", "model.onnx"}
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
