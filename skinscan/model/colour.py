"""Colour constancy: Shades of Gray (Finlayson and Trezzi, 2004), applied in training and serving alike."""

from __future__ import annotations

import numpy as np

METHODS = ("none", "shades_of_gray")


def shades_of_gray(rgb: np.ndarray, power: float = 6.0) -> np.ndarray:
    """Return an H x W x 3 uint8 image whose illuminant, estimated by the Minkowski p-norm, is neutral grey.

    Computed through 256-level tables (a histogram per channel for the norm, a lookup per channel for the gain),
    which gives the float formula's result at a small fraction of its cost per image."""
    flat = rgb.reshape(-1, 3)
    if flat.shape[0] == 0:
        return rgb
    levels = np.arange(256, dtype=np.float64) ** power
    illuminant = np.array([
        (np.bincount(flat[:, c], minlength=256) @ levels / flat.shape[0]) ** (1.0 / power) for c in range(3)
    ])
    norm = float(np.sqrt(np.sum(illuminant**2)))
    if norm <= 0.0:
        return rgb
    # Scale each channel so the estimated illuminant becomes (1, 1, 1) / sqrt(3) of the same length.
    gain = (norm / (np.maximum(illuminant, 1e-6) * np.sqrt(3.0))).astype(np.float32)
    tables = np.clip(np.arange(256, dtype=np.float32)[None, :] * gain[:, None], 0, 255).astype(np.uint8)
    out = np.empty_like(rgb)
    for c in range(3):
        out[..., c] = tables[c][rgb[..., c]]
    return out


def apply_colour_constancy(rgb: np.ndarray, method: str, power: float = 6.0) -> np.ndarray:
    """Apply the named colour-constancy method to an H x W x 3 uint8 image ('none' returns it unchanged)."""
    if method == "none":
        return rgb
    if method == "shades_of_gray":
        return shades_of_gray(rgb, power)
    raise ValueError(f"unknown colour constancy method {method!r}; expected one of {', '.join(METHODS)}")
