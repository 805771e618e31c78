"""Temperature scaling fitted on validation logits, and the referral threshold chosen there."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_curve


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Return the temperature T minimising the validation NLL of softmax(logits / T)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(y_true, dtype=torch.int64)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Return row-wise softmax of logits / temperature."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def referral_threshold(
    y_malignant: np.ndarray, malignant_score: np.ndarray, sensitivity: float = 0.95
) -> float:
    """Return the highest malignancy-score threshold whose validation sensitivity is at least the target."""
    # Every threshold: the default drops ROC points on straight runs, and the point where sensitivity first
    # reaches the target can be one of them (then a lower threshold than needed would be returned).
    fpr, tpr, thresholds = roc_curve(y_malignant, malignant_score, drop_intermediate=False)
    ok = np.where(tpr >= sensitivity)[0]
    return float(min(1.0, thresholds[ok[0]])) if len(ok) else 0.0


def flag_figures(y_malignant: np.ndarray, malignant_score: np.ndarray, threshold: float) -> dict[str, float | None]:
    """Sensitivity, specificity and flag rate (share of all images flagged) of flagging score >= threshold; None
    where a figure is undefined (no malignant, no benign or no image at all)."""
    y = np.asarray(y_malignant).astype(bool)
    flagged = np.asarray(malignant_score, dtype=np.float64) >= threshold
    return {
        "sensitivity": float(flagged[y].mean()) if y.any() else None,
        "specificity": float((~flagged[~y]).mean()) if (~y).any() else None,
        "flag_rate": float(flagged.mean()) if len(y) else None,
    }


def operating_points(
    y_malignant: np.ndarray, malignant_score: np.ndarray,
    sensitivities: tuple[float, ...] = (0.80, 0.85, 0.90, 0.92, 0.95, 0.98),
) -> list[dict[str, float | None]]:
    """Return, per target sensitivity, the validation threshold that reaches it with its specificity and flag
    rate."""
    y = np.asarray(y_malignant).astype(int)
    points = []
    for target in sensitivities:
        threshold = referral_threshold(y, malignant_score, target)
        points.append({"target_sensitivity": target, "threshold": threshold}
                      | flag_figures(y, malignant_score, threshold))
    return points


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray, present: np.ndarray) -> float:
    return float(np.mean([(pred[y == c] == c).mean() for c in present]))


def fit_logit_offsets(
    probs: np.ndarray, y_true: np.ndarray, span: float = 3.0, step: float = 0.05, rounds: int = 4,
) -> np.ndarray:
    """Per-class log-prior corrections that maximise balanced accuracy on (validation) probabilities, by
    coordinate ascent over a grid; among equally good values the one nearest zero wins, and the offsets are
    centred on the most frequent class (its offset is 0), so that they only re-balance the decision."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    logp = np.log(np.clip(probs, 1e-12, 1.0))
    present = np.unique(y)
    anchor = int(np.bincount(y, minlength=probs.shape[1]).argmax())
    offsets = np.zeros(probs.shape[1])
    grid = np.round(np.arange(-span, span + step / 2, step), 6)
    grid = grid[np.argsort(np.abs(grid), kind="stable")]  # nearest zero first: ties keep the smaller correction
    best = _balanced_accuracy(y, (logp + offsets).argmax(1), present)
    for _ in range(rounds):
        moved = False
        for c in range(probs.shape[1]):
            if c == anchor or c not in present:
                continue
            current = offsets[c]
            for value in grid:
                offsets[c] = value
                score = _balanced_accuracy(y, (logp + offsets).argmax(1), present)
                if score > best + 1e-12:
                    best, current, moved = score, value, True
            offsets[c] = current
        if not moved:
            break
    return offsets
