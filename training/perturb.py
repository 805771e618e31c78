"""How clinics' images differ: fixed perturbations for the robustness report, and their random forms for training.

Every function takes and returns an H x W x 3 uint8 RGB array. The fixed variants (`VARIANTS`) are what
`skinscan evaluate --perturb` scores a bundle under and what model choice averages over; `RandomAppearance`
draws the same kinds of change at random strengths during training, so no archive's look (its shape, camera
colour, exposure, compression or dermoscope rim) can stand in for a label.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image

SQUASH_SIDE = 224  # the square side of archives that store every image squashed (ISIC 2017: 256; others 224)
JPEG_QUALITY = 40
WARM, COOL = 1.0, -1.0  # colour_temperature strengths of the report's warm and cool variants
DARK_EV, BRIGHT_EV = -0.7, 0.6  # exposure of the report's darker and brighter variants, in stops
VIGNETTE_RADIUS = 0.85  # of the half-diagonal: a dermoscope's dark circular rim covers the corners
_GAMMA = 2.2


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize with bilinear filtering (antialiased when shrinking)."""
    img = Image.fromarray(rgb).resize((max(1, width), max(1, height)), Image.Resampling.BILINEAR)
    return np.asarray(img)


def squash_square(rgb: np.ndarray, side: int = SQUASH_SIDE) -> np.ndarray:
    """Resize to side x side without keeping the aspect ratio, as archives of square files store images."""
    return _resize(rgb, side, side)


def crop_square(rgb: np.ndarray) -> np.ndarray:
    """Centre-crop to 1:1 (the shorter side's square)."""
    h, w = rgb.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return rgb[top : top + s, left : left + s]


def pad_square(rgb: np.ndarray) -> np.ndarray:
    """Pad to 1:1 with black borders (the longer side's square)."""
    h, w = rgb.shape[:2]
    s = max(h, w)
    out = np.zeros((s, s, 3), dtype=np.uint8)
    top, left = (s - h) // 2, (s - w) // 2
    out[top : top + h, left : left + w] = rgb
    return out


def rescale(rgb: np.ndarray, factor: float = 0.5) -> np.ndarray:
    """Downscale by factor and back to the original size (a lower-resolution camera or an archive's thumbnail)."""
    h, w = rgb.shape[:2]
    small = _resize(rgb, round(w * factor), round(h * factor))
    return _resize(small, w, h)


def jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """Re-encode as JPEG at the given quality and decode again."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB"))


def _linear(rgb: np.ndarray) -> np.ndarray:
    return (rgb.astype(np.float32) / 255.0) ** _GAMMA


def _encode(linear: np.ndarray) -> np.ndarray:
    return (np.clip(linear, 0.0, 1.0) ** (1.0 / _GAMMA) * 255.0 + 0.5).astype(np.uint8)


def colour_temperature(rgb: np.ndarray, strength: float) -> np.ndarray:
    """Shift the white balance: strength > 0 warmer (more red, less blue), < 0 cooler; 1.0 is about 1,500 K."""
    gains = np.array([1.0 + 0.12 * strength, 1.0, 1.0 - 0.15 * strength], dtype=np.float32)
    return _encode(_linear(rgb) * np.maximum(gains, 0.05) ** _GAMMA)


def exposure(rgb: np.ndarray, stops: float) -> np.ndarray:
    """Change exposure by a number of stops in linear light (highlights clip as a camera's would)."""
    return _encode(_linear(rgb) * float(2.0**stops))


def vignette(rgb: np.ndarray, radius: float = VIGNETTE_RADIUS, softness: float = 0.04) -> np.ndarray:
    """Darken outside a centred circle of `radius` half-diagonals, as a contact dermoscope's rim does."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    half_diag = 0.5 * math.hypot(h, w)
    dist = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) / half_diag
    inside = np.clip((radius - dist) / max(softness, 1e-6), 0.0, 1.0)
    keep = 0.04 + 0.96 * inside  # the rim is nearly, not perfectly, black
    return (rgb.astype(np.float32) * keep[..., None] + 0.5).astype(np.uint8)


# The robustness report's variants, in report order: how other clinics' files really differ from these.
VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "clean": lambda rgb: rgb,
    "squash_square": squash_square,
    "crop_square": crop_square,
    "pad_square": pad_square,
    "half_resolution": rescale,
    "jpeg_q40": jpeg,
    "warmer": lambda rgb: colour_temperature(rgb, WARM),
    "cooler": lambda rgb: colour_temperature(rgb, COOL),
    "darker": lambda rgb: exposure(rgb, DARK_EV),
    "brighter": lambda rgb: exposure(rgb, BRIGHT_EV),
    "vignette": vignette,
}

VARIANT_HELP = {
    "clean": "the images as they are",
    "squash_square": f"squashed to {SQUASH_SIDE} x {SQUASH_SIDE} (aspect ratio lost, as square archives store them)",
    "crop_square": "centre-cropped to 1:1",
    "pad_square": "padded to 1:1 with black borders",
    "half_resolution": "downscaled to half size and back",
    "jpeg_q40": f"re-encoded as JPEG quality {JPEG_QUALITY}",
    "warmer": "white balance about 1,500 K warmer",
    "cooler": "white balance about 1,500 K cooler",
    "darker": f"exposure {DARK_EV:+g} stops",
    "brighter": f"exposure {BRIGHT_EV:+g} stops",
    "vignette": "a dermoscope's dark circular rim over the corners",
}


def apply_variant(name: str, rgb: np.ndarray) -> np.ndarray:
    """Apply one named robustness variant to an image (KeyError names the known variants)."""
    try:
        fn = VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown perturbation {name!r}; known: {', '.join(VARIANTS)}") from None
    return np.ascontiguousarray(fn(rgb))


class RandomAppearance:
    """Training augmentation of appearance on an H x W x 3 uint8 array: random white balance and exposure
    (always, over and beyond the report's strengths), and now and then a dermoscope rim, a black-bordered
    shrink along one axis (a non-square image padded to square), lower resolution and JPEG compression."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        r = self.rng
        if r.random() < 0.15:
            rgb = _pad_axis(rgb, float(r.uniform(0.6, 0.95)), axis=int(r.integers(2)))
        if r.random() < 0.25:
            rgb = vignette(rgb, radius=float(r.uniform(0.7, 1.0)), softness=float(r.uniform(0.01, 0.08)))
        if r.random() < 0.8:
            rgb = colour_temperature(rgb, float(r.uniform(-1.4, 1.4)))
        if r.random() < 0.8:
            rgb = exposure(rgb, float(r.uniform(-1.0, 0.9)))
        if r.random() < 0.2:
            rgb = rescale(rgb, float(r.uniform(0.35, 0.8)))
        if r.random() < 0.25:
            rgb = jpeg(rgb, int(r.integers(25, 90)))
        return rgb


def _pad_axis(rgb: np.ndarray, factor: float, axis: int) -> np.ndarray:
    """Shrink one axis by factor and pad it back with black: what padding a non-square image to square, then
    resizing it, does to a squashed image."""
    h, w = rgb.shape[:2]
    out = np.zeros_like(rgb)
    if axis == 0:
        nh = max(1, round(h * factor))
        top = (h - nh) // 2
        out[top : top + nh] = _resize(rgb, w, nh)
    else:
        nw = max(1, round(w * factor))
        left = (w - nw) // 2
        out[:, left : left + nw] = _resize(rgb, nw, h)
    return out
