"""MODEL_CARD.md generation from a bundle, its evaluate reports, the previous model's reports and compared runs."""

from __future__ import annotations

import json
from pathlib import Path

from training.model_card import render


def _report(tmp_path: Path, name: str, melanoma_auc: float, flag_rate: float, version: str = "new") -> Path:
    report = {
        "model_version": version, "n_images": 3, "balanced_accuracy": 0.5, "accuracy": 0.6, "macro_auc": 0.7,
        "malignant_auc": 0.8, "ece": 0.05, "ece_uncalibrated": 0.07, "melanoma_only": True,
        "melanoma": {"auc": melanoma_auc, "sensitivity_at_specificity_0.80": 0.6,
                     "sensitivity_at_specificity_0.90": 0.4},
        "referral": {"default": {"malignant_sensitivity": 0.9, "flag_rate": flag_rate},
                     "operating_points": [{"flag_rate": 0.25, "malignant_sensitivity": 0.8}]},
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(report))
    return path


def test_card_headlines_test_figures_beside_the_previous_model(smoke_bundle: Path, tmp_path: Path) -> None:
    new = _report(tmp_path, "isic2017-test", 0.85, 0.4)
    old = _report(tmp_path, "old-isic2017-test", 0.64, 0.81, version="old-model")
    text = render(smoke_bundle, [("ISIC 2017 test", "skinscan evaluate ...", new)], "- a limit",
                  previous=[("ISIC 2017 test", old)])
    assert "not a medical device" in text and "smoke-test" in text and "- a limit" in text
    assert "| metric | ISIC 2017 test: this model | ISIC 2017 test: previous (old-model) |" in text
    assert "| melanoma AUC (melanoma vs rest) | 0.850 | 0.640 |" in text
    assert "| flag rate at the default referral point | 40.0 % | 81.0 % |" in text
    # Targets: met ones say yes, missed ones say by how much, unmeasured ones say so.
    assert "| ISIC 2017 test: melanoma AUC (melanoma vs rest) >= 0.8 | 0.850 | yes |" in text
    assert "| ISIC 2017 test: images called melanoma / truly melanoma (at most) <= 1.5 | n/a | not measured |" in text
    assert "HAM10000 test: balanced multiclass accuracy >= 0.8 | n/a | not measured |" in text
    assert text.index("## Held-out test figures") < text.index("## Validation")


def test_card_claims_come_from_the_bundle(smoke_bundle: Path, tmp_path: Path) -> None:
    meta_path = smoke_bundle / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["training_data"]["counts"]["ISIC-2017_Training_Part3_GroundTruth.csv"] = {"train": 1234}
    meta["training_data"]["split_fractions"] = {"val": 0.2, "test": 0.1}
    meta["training_data"]["seed"] = 7
    meta_path.write_text(json.dumps(meta))
    text = render(smoke_bundle, [("ISIC 2017 test", "cmd", _report(tmp_path, "t", 0.7, 0.5))])
    assert "- `ISIC-2017_Training_Part3_GroundTruth.csv`: 1,234 training images; licence CC-0." in text
    assert "seed 7, fractions 0.70 / 0.20 / 0.10" in text
    assert "initialised from ImageNet (installed package weights)" in text
    assert "shades of gray colour constancy" in text
    assert "groups spanning two splits: 0" in text  # read from the bundle's splits.csv
    assert "| 0.90 (default) |" in text
    assert "| t malignant sensitivity |" not in text and "ISIC 2017 test malignant sensitivity" in text


def test_card_lists_compared_runs(smoke_bundle: Path, smoke_run: Path, tmp_path: Path) -> None:
    text = render(smoke_bundle, [("ISIC 2017 test", "cmd", _report(tmp_path, "t", 0.7, 0.5))], runs=[smoke_run])
    assert "### Runs compared" in text
    history = json.loads((smoke_run / "history.jsonl").read_text().splitlines()[0])
    assert f"| `{smoke_run.name}` | shades_of_gray | tf_efficientnet_lite0, 64 px | 1 of 1 | 1 (" in text
    best = max(history["val_score"], history.get("ema_val_score", -1))
    assert f"{best:.3f} |" in text


def _robust_report(tmp_path: Path, name: str, ba: float, mel_calls: dict[str, int]) -> Path:
    """A multiclass report with plain arg-max figures and a robustness report of three variants."""
    classes = ["mel", "nv"]
    truth = {"mel": 10, "nv": 30}

    def variant(change: float, calls: int) -> dict[str, object]:
        return {"description": "d", "balanced_accuracy": ba + change, "balanced_accuracy_plain": ba + change - 0.01,
                "macro_auc": 0.9, "melanoma_auc": 0.8, "predicted_counts": {"mel": calls, "nv": 40 - calls},
                "true_counts": truth, "melanoma_calls_ratio": calls / 10, "balanced_accuracy_change": change}

    report = json.loads(_report(tmp_path, name + "-base", 0.8, 0.4).read_text()) | {
        "melanoma_only": False, "balanced_accuracy": ba, "predicted_counts": {"mel": mel_calls["clean"], "nv": 30},
        "true_counts": truth, "plain_argmax": {"balanced_accuracy": ba - 0.02},
        "per_class": {c: {"support": truth[c], "precision": 0.5, "recall": 0.5, "f1": 0.5, "auc": 0.8}
                      for c in classes},
        "robustness": {"clean": variant(0.0, mel_calls["clean"]), "squash_square": variant(-0.04, mel_calls["squash"]),
                       "warmer": variant(0.01, 10)},
    }
    assert set(report["predicted_counts"]) == set(classes)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(report))
    return path


def test_card_shows_robustness_decision_rule_and_choices(smoke_bundle: Path, tmp_path: Path) -> None:
    """The robustness table per test set beside the previous model, the plain arg-max row, issue targets on the
    variants, and the validation choices table with each row's change of the mean over the variants."""
    new = _robust_report(tmp_path, "ham10000-test", 0.70, {"clean": 11, "squash": 12})
    old = _robust_report(tmp_path, "old", 0.72, {"clean": 13, "squash": 20})
    text = render(smoke_bundle, [("HAM10000 test", "cmd", new)], previous=[("HAM10000 test", old)],
                  choices=[("old recipe", old), ("new recipe", new)])
    assert "| balanced multiclass accuracy, plain arg-max | 0.680 | 0.700 |" in text
    assert "| images called melanoma / truly melanoma | 11 / 10 | 13 / 10 |" in text
    assert "| HAM10000 test: largest balanced-accuracy drop of a robustness variant (at most) <= 0.03 | 0.040 | " \
           "no, by 0.010 |" in text
    assert "| HAM10000 test: largest departure of a variant's melanoma calls from the true count (at most) <= 0.2 " \
           "| 0.200 | yes |" in text
    assert "| squash_square: d | 0.660 (-0.040) | 0.650 | 0.800 | 12 / 10 | 0.680 | 0.800 | 20 / 10 | 12 / 28 |" in text
    assert "True counts (mel, nv): 10 / 30." in text
    assert "### Choices and their validation effect" in text
    assert "| old recipe | 0.720 | 0.700 | 0.710 | 0.040 | 0.800 | 13 / 10 |  |" in text
    assert "| new recipe | 0.700 | 0.680 | 0.690 | 0.040 | 0.800 | 11 / 10 | -0.020 |" in text


def test_card_shows_capacity_steps_from_training_compare(smoke_bundle: Path, tmp_path: Path) -> None:
    """`--capacity`: the rows of `python -m training.compare` (each bundle and their ensemble) as a table."""
    rows = [{"name": "a", "balanced_accuracy": 0.66, "balanced_accuracy_corrected": 0.67, "score": 0.646,
             "score_corrected": 0.667, "macro_auc": 0.93, "melanoma_auc": 0.867, "worst_variant_drop": 0.037},
            {"name": "a + b", "balanced_accuracy": 0.67, "balanced_accuracy_corrected": 0.69, "score": 0.646,
             "score_corrected": 0.681, "macro_auc": 0.936, "melanoma_auc": 0.870, "worst_variant_drop": 0.055}]
    path = tmp_path / "compare.json"
    path.write_text(json.dumps(rows))
    text = render(smoke_bundle, [], capacity=path)
    assert "### Capacity steps" in text
    assert "| a | 0.660 / 0.670 | 0.646 / 0.667 | 0.037 | 0.930 | 0.867 |" in text
    assert "| a + b | 0.670 / 0.690 | 0.646 / 0.681 | 0.055 | 0.936 | 0.870 |" in text
    assert "### Capacity steps" not in render(smoke_bundle, [])
