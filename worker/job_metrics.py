"""Per-job metrics: class distribution and referral counts, and quality figures when labels came along."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from skinscan.labels import CLASSES
from skinscan.tables import ImageRecord, Job, Prediction


def compute_job_metrics(session: Session, job: Job) -> dict[str, Any]:
    """Return counts, predicted-class distribution, flagged count and, with labels, a classification report."""
    rows = session.execute(
        select(ImageRecord.true_label, Prediction.label, Prediction.probabilities, Prediction.flagged)
        .join(Prediction, Prediction.image_id == ImageRecord.id)
        .where(ImageRecord.job_id == job.id, Prediction.model_version == job.model_version)
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
        from training.metrics import classification_report

        y = np.array([CLASSES.index(r.true_label) for r in labelled])
        probs = np.array([[r.probabilities[c] for c in CLASSES] for r in labelled])
        report = classification_report(y, probs, CLASSES, known_labels=job.known_labels)
        metrics["labels_format"] = job.labels_format
        metrics.update({k: report[k] for k in ("accuracy", "balanced_accuracy", "macro_auc", "per_class",
                                               "melanoma", "malignant_auc", "ece", "confusion_matrix",
                                               "known_labels", "n_images")})
    return metrics
