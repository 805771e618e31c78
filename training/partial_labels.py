"""Partial labels: supervise an image only on what its ground truth says (ISIC 2017's "neither" is not nevus)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from skinscan.labels import CLASSES


def allowed_classes(label: str, dataset_format: str) -> tuple[str, ...]:
    """Return the classes an image's label leaves possible: ISIC 2017's "neither melanoma nor keratosis" rules out
    only those two; every other label names one class."""
    if dataset_format == "isic2017" and label == "nv":
        return tuple(c for c in CLASSES if c not in ("mel", "bkl"))
    return (label,)


def allowed_mask(labels: Sequence[str], formats: Sequence[str]) -> np.ndarray:
    """Return an N x C boolean matrix, True where the class is possible for the image."""
    mask = np.zeros((len(labels), len(CLASSES)), dtype=bool)
    for i, (label, fmt) in enumerate(zip(labels, formats, strict=True)):
        for c in allowed_classes(label, fmt):
            mask[i, CLASSES.index(c)] = True
    return mask


def partial_label_loss(
    logits: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None, smoothing: float = 0.0
) -> torch.Tensor:
    """Return the weighted mean of -log P(class in allowed set), mixed with uniform label smoothing.

    With one allowed class per row this is cross-entropy with label smoothing."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=1)
    log_allowed = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=1)
    loss = (1.0 - smoothing) * (log_z - log_allowed) + smoothing * (log_z - logits.mean(dim=1))
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum()
