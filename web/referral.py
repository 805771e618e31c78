"""The referral operating point behind a model version's flags, and why one image was flagged, in words."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import has_app_context
from sqlalchemy.orm import Session

from skinscan.tables import ModelVersion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatingPoint:
    """The threshold on the malignancy score a model version flags at, and what it was chosen for."""

    threshold: float
    target_sensitivity: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    flag_rate: float | None = None
    chosen_on: str | None = None
    uncertain_below: float | None = None

    @property
    def label(self) -> str:
        """Short name of the point, e.g. '92% sensitivity operating point'."""
        if self.target_sensitivity is None:
            return "the model's referral threshold"
        return f"{self.target_sensitivity * 100:g}% sensitivity operating point"

    def as_dict(self) -> dict[str, Any]:
        """JSON form (for the status poll and exports)."""
        return {"threshold": self.threshold, "target_sensitivity": self.target_sensitivity,
                "sensitivity": self.sensitivity, "specificity": self.specificity, "flag_rate": self.flag_rate,
                "chosen_on": self.chosen_on, "uncertain_below": self.uncertain_below, "label": self.label}


def deployment_sensitivity() -> float | None:
    """The sensitivity target this deployment scores at (SKINSCAN_REFERRAL_SENSITIVITY; None: the bundle's)."""
    if not has_app_context():
        return None
    from web.context import settings

    return settings().referral_sensitivity


def operating_point(session: Session, version: str | None, sensitivity: float | None = None) -> OperatingPoint | None:
    """Return the operating point of a registered model version at a sensitivity target (None: its default)."""
    from skinscan.model.bundle import BundleError, referral_threshold

    model = session.get(ModelVersion, version) if version else None
    meta = (model.meta or {}) if model else {}
    referral = meta.get("referral") or {}
    if not referral:
        return None
    try:
        threshold = referral_threshold(meta, sensitivity)
    except BundleError:
        log.warning("model %s has no operating point for sensitivity %s; showing its default", version, sensitivity)
        sensitivity, threshold = None, referral_threshold(meta)
    target = sensitivity if sensitivity is not None else referral.get("target_malignant_sensitivity")
    point: dict[str, Any] = {}
    for candidate in referral.get("operating_points") or []:
        if target is not None and abs(float(candidate.get("target_sensitivity", -1)) - float(target)) < 1e-6:
            point = candidate
    uncertain = referral.get("uncertain_below")
    return OperatingPoint(
        threshold=float(threshold), target_sensitivity=None if target is None else float(target),
        sensitivity=_opt(point.get("sensitivity")), specificity=_opt(point.get("specificity")),
        flag_rate=_opt(point.get("flag_rate")), chosen_on=referral.get("chosen_on"),
        uncertain_below=0.5 if uncertain is None else float(uncertain),
    )


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


def flag_reason(flagged: bool | None, malignancy: float | None, confidence: float | None,
                point: OperatingPoint | None) -> str:
    """Why an image was flagged, e.g. 'malignant probability 0.41 >= threshold 0.18 (92% sensitivity operating
    point)'; empty when it was not flagged or not scored."""
    if not flagged or malignancy is None:
        return ""
    if point is None:
        return f"flagged by the model's referral rule (malignant probability {malignancy:.2f})"
    reasons = []
    if malignancy >= point.threshold - 1e-6:  # the stored score is rounded to six places
        reasons.append(f"malignant probability {malignancy:.2f} >= threshold {point.threshold:.2f} ({point.label})")
    if confidence is not None and point.uncertain_below is not None and confidence < point.uncertain_below:
        reasons.append(f"model unsure: top class probability {confidence:.2f} < {point.uncertain_below:.2f}")
    if not reasons:  # the deployment's threshold changed since the image was scored
        reasons.append(f"flagged when scored (malignant probability {malignancy:.2f}; threshold now "
                       f"{point.threshold:.2f})")
    return "; ".join(reasons)
