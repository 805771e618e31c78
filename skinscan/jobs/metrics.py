"""Per-job metrics: class distribution and referral counts, and quality figures when labels came along."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from skinscan.labels import CLASSES
from skinscan.tables import ImageRecord, Job, JobMetrics, Prediction, utcnow


def compute_job_metrics(session: Session, job: Job) -> dict[str, Any]:
    """Return counts, predicted-class distribution, flagged count and, with labels, a classification report."""
    rows = session.execute(
        select(ImageRecord.true_label, Prediction.label, Prediction.probabilities, Prediction.flagged)
        .join(Prediction, Prediction.image_id == ImageRecord.id)
        .where(ImageRecord.job_id == job.id, Prediction.model_version == job.model_version,
               ImageRecord.status == "scored")  # a cancelled image's late prediction is not a result
    ).all()
    distribution = Counter(r.label for r in rows)
    metrics: dict[str, Any] = {
        "model_version": job.model_version,
        "counts": {"total": job.total, "scored": job.scored, "failed": job.failed},
        "class_distribution": {c: distribution.get(c, 0) for c in CLASSES},
        "flagged": sum(1 for r in rows if r.flagged),
        "labelled": sum(1 for r in rows if r.true_label),
    }
    labelled = [r for r in rows if r.true_label in CLASSES]
    if labelled:
        from skinscan.model.metrics import classification_report

        y = np.array([CLASSES.index(r.true_label) for r in labelled])
        probs = np.array([[r.probabilities[c] for c in CLASSES] for r in labelled])
        # The decisions are the stored labels (the bundle's decision rule), not a plain arg-max of probabilities.
        pred = np.array([CLASSES.index(r.label) for r in labelled])
        report = classification_report(y, probs, CLASSES, known_labels=job.known_labels, y_pred=pred)
        metrics["labels_format"] = job.labels_format
        metrics.update({k: report[k] for k in ("accuracy", "balanced_accuracy", "macro_auc", "per_class",
                                               "melanoma", "malignant_auc", "ece", "confusion_matrix",
                                               "known_labels", "n_images")})
        metrics["confusion_matrix_classes"] = list(CLASSES)
        null_unsupported(metrics)
    return metrics


def null_unsupported(metrics: dict[str, Any]) -> dict[str, Any]:
    """Set per-class recall to None where a class has no labelled image, precision where none was predicted as it.

    A figure over zero images is undefined, not 0.0; F1 is None with recall. Works on stored metrics too (from
    before this rule): the counts come from the confusion matrix (rows: true label, columns: prediction, CLASSES order).
    """
    matrix = metrics.get("confusion_matrix")
    per_class = metrics.get("per_class")
    if not matrix or not per_class:
        return metrics
    order = metrics.get("confusion_matrix_classes") or list(CLASSES)
    metrics["confusion_matrix_classes"] = list(order)
    metrics["per_class"] = per_class = {name: dict(figures) for name, figures in per_class.items()}  # a copy
    for i, name in enumerate(order):
        figures = per_class.get(name)
        if figures is None or i >= len(matrix):
            continue
        if sum(matrix[i]) == 0:
            figures["recall"] = None
        if sum(row[i] for row in matrix if i < len(row)) == 0:
            figures["precision"] = None
        if figures.get("recall") is None:  # never predicted but labelled: recall 0, so F1 0 stays
            figures["f1"] = None
    return metrics


def store_job_metrics(session: Session, job: Job) -> dict[str, Any]:
    """Compute a job's metrics from its scored images and store them for its model version (replacing any)."""
    session.flush()
    metrics = compute_job_metrics(session, job)
    existing = session.get(JobMetrics, (job.id, job.model_version))
    if existing is None:
        session.add(JobMetrics(job_id=job.id, model_version=job.model_version, metrics=metrics))
    else:
        existing.metrics, existing.computed_at = metrics, utcnow()
    return metrics
