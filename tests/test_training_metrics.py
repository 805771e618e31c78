"""Metrics checked against values worked out by hand on tiny examples, and the shipped bundle's split checked for
leaks: no lesion, duplicate group or known duplicate pair on two sides of train / validation / test."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from skinscan.labels import CLASSES
from skinscan.model.metrics import (
    classification_report,
    expected_calibration_error,
    reliability_bins,
    sensitivity_at_specificity,
)
from training.calibration import operating_points, referral_threshold
from training.splits import KNOWN_DUPLICATES

MEL, NV, BCC = CLASSES.index("mel"), CLASSES.index("nv"), CLASSES.index("bcc")
BUNDLE = Path(__file__).resolve().parents[1] / "skinscan" / "bundles" / "default"


def _probs(rows: list[dict[int, float]]) -> np.ndarray:
    """Rows of class index -> probability (the rest 0) as an (n, 7) array."""
    out = np.zeros((len(rows), len(CLASSES)))
    for i, row in enumerate(rows):
        for c, p in row.items():
            out[i, c] = p
    return out


# Five images of three classes (mel, nv, bcc); the other four classes have no image.
#   image  truth  mel   nv    bcc   predicted
#   1      mel    .90   .10   0     mel  (right)
#   2      mel    .40   .60   0     nv   (wrong)
#   3      nv     .60   .40   0     mel  (wrong)
#   4      nv     .20   .80   0     nv   (right)
#   5      bcc    .45   .05   .50   bcc  (right)
Y5 = [MEL, MEL, NV, NV, BCC]
P5 = _probs([{MEL: .9, NV: .1}, {MEL: .4, NV: .6}, {MEL: .6, NV: .4}, {MEL: .2, NV: .8},
             {MEL: .45, NV: .05, BCC: .5}])


def test_balanced_accuracy_by_hand() -> None:
    """Recall mel 1/2, nv 1/2, bcc 1/1; balanced accuracy is their mean over the three classes present:
    (1/2 + 1/2 + 1) / 3 = 2/3 (the four absent classes do not count as recall 0). Accuracy 3/5."""
    report = classification_report(Y5, P5)
    assert report["balanced_accuracy"] == pytest.approx(2 / 3)
    assert report["balanced_accuracy_sklearn"] == pytest.approx(2 / 3)
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["per_class"]["mel"]["recall"] == pytest.approx(1 / 2)
    assert report["per_class"]["bcc"]["recall"] == 1.0 and report["per_class"]["df"]["support"] == 0


def test_macro_auc_by_hand() -> None:
    """One-vs-rest AUC = share of (positive, negative) pairs ranked right.
    mel: positives .9, .4 against negatives .6, .2, .45: .9 beats 3, .4 beats only .2 -> 4/6 = 2/3.
    nv: positives .4, .8 against negatives .1, .6, .05: .4 beats .1 and .05, .8 beats 3 -> 5/6.
    bcc: positive .5 against four 0s -> 1. Absent classes have no AUC. Macro: (2/3 + 5/6 + 1) / 3 = 5/6."""
    report = classification_report(Y5, P5)
    assert report["per_class"]["mel"]["auc"] == pytest.approx(2 / 3)
    assert report["per_class"]["nv"]["auc"] == pytest.approx(5 / 6)
    assert report["per_class"]["bcc"]["auc"] == pytest.approx(1.0)
    assert report["per_class"]["df"]["auc"] is None
    assert report["macro_auc"] == pytest.approx(5 / 6)


# Melanoma against the rest: four melanomas and five others.
Y_MEL = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
S_MEL = np.array([.9, .8, .5, .3, .7, .4, .2, .1, .05])


def test_melanoma_sensitivity_at_fixed_specificity_by_hand() -> None:
    """Specificity >= 0.80 allows 1 false positive of 5: threshold .5 flags melanomas .9 .8 .5 and the other .7,
    sensitivity 3/4 (threshold .4 would add a second false positive). Specificity >= 0.90 allows 0 of 5: threshold
    .8 flags .9 .8, sensitivity 2/4. Specificity 0 allows everything: 1. Melanoma AUC: .9 and .8 beat all 5 others,
    .5 beats 4, .3 beats 3 -> 17/20."""
    assert sensitivity_at_specificity(Y_MEL, S_MEL, 0.80) == pytest.approx(0.75)
    assert sensitivity_at_specificity(Y_MEL, S_MEL, 0.90) == pytest.approx(0.50)
    assert sensitivity_at_specificity(Y_MEL, S_MEL, 0.0) == 1.0
    assert sensitivity_at_specificity(np.ones(3, dtype=int), np.array([.1, .2, .3]), 0.9) is None
    probs = np.zeros((9, len(CLASSES)))
    probs[:, MEL], probs[:, NV] = S_MEL, 1 - S_MEL
    report = classification_report(np.where(Y_MEL == 1, MEL, NV), probs)
    assert report["melanoma"]["auc"] == pytest.approx(17 / 20)
    assert report["melanoma"]["sensitivity_at_specificity_0.80"] == pytest.approx(0.75)
    assert report["melanoma"]["sensitivity_at_specificity_0.90"] == pytest.approx(0.50)


def test_expected_calibration_error_by_hand() -> None:
    """Five two-class predictions:
    confidence .9 (bin 13 of 15): right, right, wrong -> accuracy 2/3, gap |2/3 - .9| = 7/30;
    confidence .7 (bin 10 of 15): right, right -> accuracy 1, gap |1 - .7| = .3.
    ECE = 3/5 * 7/30 + 2/5 * .3 = .14 + .12 = .26. With one bin the over- and under-confidence cancel:
    mean confidence (3 * .9 + 2 * .7) / 5 = .82 against accuracy 4/5 -> .02."""
    probs = np.array([[.9, .1], [.9, .1], [.1, .9], [.7, .3], [.3, .7]])
    y = np.array([0, 0, 0, 0, 1])
    assert expected_calibration_error(probs, y) == pytest.approx(0.26)
    assert expected_calibration_error(probs, y, n_bins=1) == pytest.approx(0.02)
    assert expected_calibration_error(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1])) == 0.0
    # The reliability diagram is the same binning: bin 10 (.667-.733) and bin 13 (.867-.933) of 15.
    bins = reliability_bins(probs, y)
    assert bins["center"] == pytest.approx([10.5 / 15, 13.5 / 15])
    assert bins["confidence"] == pytest.approx([0.7, 0.9])
    assert bins["accuracy"] == pytest.approx([1.0, 2 / 3])
    assert bins["count"] == [2, 3]


# Malignant against benign: four malignant, three benign.
Y_MAL = np.array([1, 1, 1, 1, 0, 0, 0])
S_MAL = np.array([.9, .8, .4, .2, .5, .3, .1])


@pytest.mark.parametrize(("target", "threshold"), [
    (0.25, 0.9),  # flag >= .9: 1 of 4 malignant
    (0.50, 0.8),  # flag >= .8: 2 of 4 (.9 and .8 follow each other with no benign between)
    (0.60, 0.4),  # 3 of 4 needs .4, which also flags benign .5
    (0.75, 0.4),
    (0.95, 0.2),  # all 4 needs .2
    (1.00, 0.2),
])
def test_referral_threshold_by_hand(target: float, threshold: float) -> None:
    """The highest threshold whose sensitivity reaches the target, read off the sorted scores by hand."""
    assert referral_threshold(Y_MAL, S_MAL, target) == pytest.approx(threshold)


def test_referral_threshold_inside_a_run_of_malignant_scores() -> None:
    """Three malignant scores in a row with no benign between (.9 .8 .7, benign .1): 2/3 sensitivity needs
    threshold .8; scikit-learn's default ROC drops that point (it lies on a straight run), which gave .7."""
    y, score = np.array([1, 1, 1, 0]), np.array([.9, .8, .7, .1])
    assert referral_threshold(y, score, 0.6) == pytest.approx(0.8)
    point = operating_points(y, score, (0.6,))[0]
    assert point["sensitivity"] == pytest.approx(2 / 3) and point["specificity"] == 1.0
    assert point["flag_rate"] == pytest.approx(2 / 4)


def test_known_labels_is_recorded_and_restricts_nothing() -> None:
    """known_labels changes no figure; it is carried in the report (every class when not given)."""
    plain = classification_report(Y5, P5)
    known = classification_report(Y5, P5, known_labels=("mel", "bkl", "nv"))
    assert known.pop("known_labels") == ["mel", "bkl", "nv"]
    assert plain.pop("known_labels") == list(CLASSES)
    assert json.dumps(known, sort_keys=True) == json.dumps(plain, sort_keys=True)


# --- the shipped bundle's split ----------------------------------------------------------------------------------

def _split_rows() -> list[dict[str, str]]:
    with (BUNDLE / "splits.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and set(rows[0]) == {"image_id", "lesion_id", "group", "label", "split"}
    return rows


def test_shipped_split_keeps_every_lesion_and_group_on_one_side() -> None:
    """No lesion_id and no duplicate group is in two of train/val/test; a lesion never spans two groups; an
    image left unused belongs to a group held in validation or test."""
    rows = _split_rows()
    assert {r["split"] for r in rows} <= {"train", "val", "test", "unused"}
    assert len({r["image_id"] for r in rows}) == len(rows)
    used = [r for r in rows if r["split"] != "unused"]
    for key in ("lesion_id", "group"):
        sides: dict[str, set[str]] = defaultdict(set)
        for r in used:
            sides[r[key]].add(r["split"])
        crossing = {k: v for k, v in sides.items() if len(v) > 1}
        assert not crossing, f"{len(crossing)} {key}s span splits, e.g. {next(iter(crossing.items()))}"
    groups_of_lesion: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        groups_of_lesion[r["lesion_id"]].add(r["group"])
    assert all(len(g) == 1 for g in groups_of_lesion.values())
    side_of_group = {r["group"]: r["split"] for r in used}
    for r in rows:
        if r["split"] == "unused":
            assert side_of_group.get(r["group"]) in ("val", "test"), r


def test_shipped_split_keeps_known_duplicates_together(isic2017_dir: Path) -> None:
    """Each known duplicate pair is on one side: both in one split when both are in splits.csv, and never one in
    training while its twin is in validation/test or in a held-out set named by the bundle."""
    rows = {r["image_id"]: r for r in _split_rows()}
    meta = json.loads((BUNDLE / "metadata.json").read_text())
    held_out: set[str] = set()
    for name in meta["training_data"].get("held_out_sets", []):
        with (isic2017_dir / name).open(newline="") as fh:
            held_out |= {r["image_id"] for r in csv.DictReader(fh)}
    assert held_out, "the bundle names held-out sets"
    assert not held_out & {i for i, r in rows.items() if r["split"] == "train"}
    checked = 0
    for a, b in KNOWN_DUPLICATES:
        sides = {rows[i]["split"] for i in (a, b) if i in rows and rows[i]["split"] != "unused"}
        sides |= {"held-out" for i in (a, b) if i in held_out}
        assert not ("train" in sides and sides & {"val", "test", "held-out"}), (a, b, sides)
        if a in rows and b in rows:
            assert rows[a]["group"] == rows[b]["group"] and rows[a]["split"] == rows[b]["split"], (a, b)
            checked += 1
    assert checked >= 1  # HAM10000's pair is in the split itself
