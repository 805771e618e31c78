"""Grad-CAM heatmaps of bundles without a feature-map output: computed on demand with PyTorch, cached in storage.

A bundle whose ONNX model also outputs its last feature map gets each prediction's Grad-CAM grid while scoring
(skinscan.model.bundle.cam_grid; predictions.heatmap) and the web draws it: no task, no PyTorch."""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from skinscan.imaging import ImageError, decode_rgb
from skinscan.model.bundle import find_target_layer
from skinscan.model.heatmaps import heatmap_key, state_key, write_state
from skinscan.settings import Settings, load_settings
from skinscan.tables import ImageRecord, Prediction

if TYPE_CHECKING:  # the web process asks for heatmaps without importing PyTorch
    import torch

    from skinscan.model.bundle import Bundle

log = logging.getLogger(__name__)

DISPLAY_SIDE = 384

_MODELS: dict[str, tuple[Bundle, torch.nn.Module, torch.nn.Module]] = {}
_LOCK = threading.Lock()
_CAM_LOCK = threading.Lock()


def _model_for(path: Path) -> tuple[Bundle, torch.nn.Module, torch.nn.Module]:
    """Return this process's (bundle, PyTorch model, target layer) for a bundle folder, loaded once."""
    from skinscan.model.bundle import load_bundle

    key = str(Path(path).resolve())
    with _LOCK:
        if key not in _MODELS:
            bundle = load_bundle(path)
            model = bundle.torch_model()
            _MODELS[key] = (bundle, model, find_target_layer(model))
            log.info("Grad-CAM model %s loaded", bundle.version)
        return _MODELS[key]


def display_crop(img: PILImage.Image, bundle: Bundle, side: int) -> PILImage.Image:
    """Return what the network sees, for the heat map to lie on: in squash mode the whole image at its own aspect
    ratio, its longer side `side` pixels (the map is un-squashed onto it); in crop mode the centre square the
    network sees (the bundle's resize and crop), at side x side pixels."""
    width, height = img.size
    if bundle.resize_mode == "squash":
        scale = side / max(width, height)
        return img.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                          PILImage.Resampling.BILINEAR)
    crop = min(width, height) * bundle.input_size / bundle.resize_size
    left, top = (width - crop) / 2, (height - crop) / 2
    return img.resize((side, side), PILImage.Resampling.BILINEAR, box=(left, top, left + crop, top + crop))


def render_heatmap(bundle: Bundle, model: torch.nn.Module, layer: torch.nn.Module, data: bytes,
                   label: str | None = None, side: int = DISPLAY_SIDE) -> bytes:
    """Return a PNG of the Grad-CAM heatmap for `label` (else the top class) over the crop the network sees."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    img = decode_rgb(data)
    x = torch.from_numpy(bundle.preprocess(img))[None]
    targets = [ClassifierOutputTarget(bundle.classes.index(label))] if label in bundle.classes else None
    with _CAM_LOCK, torch.enable_grad(), GradCAM(model=model, target_layers=[layer]) as cam:
        mask = cam(input_tensor=x, targets=targets)[0]
    base_img = display_crop(img, bundle, side)
    mask_img = PILImage.fromarray(np.asarray(mask, dtype=np.float32), mode="F")
    mask = np.clip(np.asarray(mask_img.resize(base_img.size, PILImage.Resampling.BILINEAR)), 0.0, 1.0)
    base = np.asarray(base_img, dtype=np.float32) / 255.0
    overlay = show_cam_on_image(base, mask, use_rgb=True, image_weight=0.6)
    out = io.BytesIO()
    PILImage.fromarray(overlay).save(out, format="PNG", optimize=True)
    return out.getvalue()


def _prediction(session: Session, image_id: str, model_version: str) -> Prediction | None:
    return session.scalars(select(Prediction).where(Prediction.image_id == image_id,
                                                    Prediction.model_version == model_version)).first()


def compute_heatmap(image_id: str, model_version: str, settings: Settings | None = None) -> bool:
    """Compute and cache one image's heatmap for the class the model version predicted; True when cached."""
    from skinscan.db import session_scope
    from skinscan.model.bundle import BundleError
    from skinscan.model.registry import RegistryError, bundle_ref
    from skinscan.model.store import BundleRef, BundleStoreError, local_bundle
    from skinscan.storage import get_storage

    settings = settings or load_settings()
    storage = get_storage(settings)
    with session_scope(settings) as session:
        image = session.get(ImageRecord, image_id)
        if image is None or not image.storage_key:
            log.warning("Grad-CAM: image %s is gone or was never stored", image_id)
            return False
        session.expunge(image)
        prediction = _prediction(session, image_id, model_version)
        label = prediction.label if prediction else None
        try:
            ref: BundleRef | None = bundle_ref(session, model_version)
        except RegistryError:
            ref = None
    key = heatmap_key(image, model_version)
    if storage.exists(key):
        return True
    try:
        if ref is None:
            raise BundleError(f"model version {model_version} is not registered")
        bundle, model, layer = _model_for(local_bundle(ref, settings, storage))
        png = render_heatmap(bundle, model, layer, storage.get(image.storage_key), label)
    except ImportError as exc:  # a lean install: this bundle has no feature-map output, and PyTorch is not here
        error = (f"heat maps of model {model_version} need PyTorch, which this worker lacks ({exc.name}): install "
                 "the `train` extra, or use a bundle exported with its feature map")
        write_state(storage, state_key(image, model_version), {"state": "error", "error": error})
        log.warning("Grad-CAM for image %s failed: %s", image_id, error)
        return False
    except (ImageError, BundleError, BundleStoreError) as exc:
        write_state(storage, state_key(image, model_version), {"state": "error", "error": str(exc)})
        log.warning("Grad-CAM for image %s failed: %s", image_id, exc)
        return False
    storage.put(key, png, "image/png")
    storage.delete(state_key(image, model_version))
    if not _still_there(image_id, settings):
        # Its job was deleted while this ran. A deletion commits its rows before it lists and removes the job's
        # objects, so either that listing saw this heatmap or the row is gone by now and the heatmap goes here.
        storage.delete(key)
        log.info("Grad-CAM for image %s discarded: its job was deleted meanwhile", image_id)
        return False
    log.info("Grad-CAM for image %s (model %s) cached", image_id, model_version)
    return True


def _still_there(image_id: str, settings: Settings) -> bool:
    """Whether the image's row still exists (a committed job deletion removes it)."""
    from skinscan.db import session_scope

    with session_scope(settings) as session:
        return session.get(ImageRecord, image_id) is not None
