"""MODEL_CARD.md generation from a bundle and its evaluate reports."""

from __future__ import annotations

import json
from pathlib import Path

from training.model_card import render


def _report(tmp_path: Path) -> Path:
    report = {
        "n_images": 3, "balanced_accuracy": 0.5, "accuracy": 0.6, "macro_auc": 0.7, "malignant_auc": 0.8,
        "ece": 0.05, "ece_uncalibrated": 0.07, "melanoma_only": True,
        "melanoma": {"auc": 0.75, "sensitivity_at_specificity_0.80": 0.6, "sensitivity_at_specificity_0.90": 0.4},
    }
    path = tmp_path / "isic2017-test.json"
    path.write_text(json.dumps(report))
    return path


def test_card_states_use_and_figures(smoke_bundle: Path, tmp_path: Path) -> None:
    text = render(smoke_bundle, [("ISIC 2017 test", "skinscan evaluate ...", _report(tmp_path))], "- a limit")
    assert "not a medical device" in text and "smoke-test" in text
    assert "| melanoma AUC (melanoma vs rest) | 0.750 |" in text
    assert "External test: ISIC 2017" in text and "- a limit" in text


def test_card_says_when_isic2017_was_trained_on(smoke_bundle: Path, tmp_path: Path) -> None:
    meta_path = smoke_bundle / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["training_data"]["extra_training_sets"] = ["ISIC-2017_Training_Part3_GroundTruth.csv"]
    meta["training_data"]["held_out_sets"] = ["ISIC-2017_Test_v2_Part3_GroundTruth.csv"]
    meta_path.write_text(json.dumps(meta))
    text = render(smoke_bundle, [("ISIC 2017 test", "skinscan evaluate ...", _report(tmp_path))])
    assert "Also trained on: `ISIC-2017_Training_Part3_GroundTruth.csv`" in text
    assert "no longer an external collection" in text and "External test: ISIC 2017" not in text
