"""Model-quality metrics the way dermatology papers report them, computed with scikit-learn."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from skinscan.labels import CLASSES, MALIGNANT
from skinscan.model.bundle import decide

ECE_BINS = 15


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Return each non-empty equal-width confidence bin's centre, mean confidence, accuracy and count of the
    top-label prediction: the reliability diagram, and the one binning behind the ECE."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    out: dict[str, list[float]] = {"center": [], "confidence": [], "accuracy": [], "count": []}
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            out["center"].append(float((edges[b] + edges[b + 1]) / 2))
            out["confidence"].append(float(confidence[mask].mean()))
            out["accuracy"].append(float(correct[mask].mean()))
            out["count"].append(int(mask.sum()))
    return out


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Return the top-label expected calibration error with equal-width confidence bins."""
    bins = reliability_bins(probs, y_true, n_bins)
    count = np.asarray(bins["count"], dtype=np.float64)
    gap = np.abs(np.asarray(bins["accuracy"]) - np.asarray(bins["confidence"]))
    return float((count * gap).sum() / count.sum()) if count.size else 0.0


def sensitivity_at_specificity(y_binary: np.ndarray, score: np.ndarray, specificity: float) -> float | None:
    """Return the highest sensitivity reachable while keeping specificity at least the given value."""
    if y_binary.min() == y_binary.max():
        return None
    fpr, tpr, _ = roc_curve(y_binary, score)
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def _auc(y_binary: np.ndarray, score: np.ndarray) -> float | None:
    if y_binary.min() == y_binary.max():
        return None
    return float(roc_auc_score(y_binary, score))


def _sklearn_balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """scikit-learn's balanced accuracy, without its warning for predictions of classes absent from the truth."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y_true, y_pred))


def classification_report(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str] = CLASSES,
    known_labels: Sequence[str] | None = None,
    logit_offsets: np.ndarray | None = None,
    y_pred: Sequence[int] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Return balanced accuracy, per-class precision/recall/F1/AUC, melanoma and malignant AUC, ECE and more.

    The figures cover the classes present in the ground truth: balanced accuracy averages their recalls, the
    macro AUC their one-vs-rest AUCs (a class with no image, or every image, has none). known_labels (the classes
    a dataset can tell apart: ISIC 2017 knows melanoma, seborrheic keratosis and nevus) restricts nothing; it is
    recorded in the report, every class by default, for readers such as the job page's confusion matrix.
    Decisions (recall, precision, confusion, balanced accuracy) are y_pred when given (the labels stored with
    predictions), else `decide` with logit_offsets; AUCs and calibration use the probabilities alone.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    classes = list(classes)
    y_pred = decide(probs, logit_offsets) if y_pred is None else np.asarray(y_pred, dtype=np.int64)
    present = sorted(set(y_true.tolist()))
    labels_idx = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels_idx, zero_division=0
    )
    per_class: dict[str, dict[str, float | int | None]] = {}
    aucs = []
    for i, name in enumerate(classes):
        auc = _auc((y_true == i).astype(int), probs[:, i])
        if auc is not None:
            aucs.append(auc)
        per_class[name] = {
            "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
            "auc": auc, "support": int(support[i]),
        }
    mel = classes.index("mel")
    y_mel = (y_true == mel).astype(int)
    malignant_idx = [classes.index(c) for c in classes if c in MALIGNANT]
    y_malig = np.isin(y_true, malignant_idx).astype(int)
    malignant_score = probs[:, malignant_idx].sum(axis=1)
    known = list(known_labels) if known_labels else classes
    # Balanced accuracy over the classes present in the ground truth (mean per-class recall).
    balanced = float(np.mean([per_class[classes[i]]["recall"] for i in present])) if present else 0.0
    return {
        "n_images": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced,
        "balanced_accuracy_sklearn": _sklearn_balanced_accuracy(y_true, y_pred) if present else 0.0,
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "per_class": per_class,
        "melanoma": {
            "auc": _auc(y_mel, probs[:, mel]),
            "sensitivity_at_specificity_0.80": sensitivity_at_specificity(y_mel, probs[:, mel], 0.80),
            "sensitivity_at_specificity_0.90": sensitivity_at_specificity(y_mel, probs[:, mel], 0.90),
        },
        "malignant_auc": _auc(y_malig, malignant_score),
        "ece": expected_calibration_error(probs, y_true),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels_idx).tolist(),
        "predicted_counts": {name: int((y_pred == i).sum()) for i, name in enumerate(classes)},
        "true_counts": {name: int((y_true == i).sum()) for i, name in enumerate(classes)},
        "classes": classes,
        "known_labels": known,
    }
