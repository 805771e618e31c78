"""Heat maps in storage: where each image's Grad-CAM overlay (per model version) is cached, its state, and
asking a worker to compute one (the web asks, worker/gradcam.py computes it with PyTorch)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from skinscan.settings import Settings
from skinscan.storage import Storage, StorageError
from skinscan.tables import ImageRecord

log = logging.getLogger(__name__)

# A request older than this with no heatmap yet (a lost message, a crashed worker) is sent again.
PENDING_SECONDS = 300


def _version_tag(model_version: str) -> str:
    return hashlib.sha256(model_version.encode()).hexdigest()[:16]


def heatmap_key(image: ImageRecord, model_version: str) -> str:
    """Return the storage key of an image's cached heatmap under a model version."""
    return f"{image.clinic_id}/{image.job_id}/gradcam/{image.id}-{_version_tag(model_version)}.png"


def state_key(image: ImageRecord, model_version: str) -> str:
    """Return the storage key of the JSON state (pending since, or the error) of an image's heat map."""
    return heatmap_key(image, model_version)[: -len(".png")] + ".state.json"


def read_state(storage: Storage, key: str) -> dict[str, Any]:
    """Return a heat map's stored state ({} when there is none or it cannot be read)."""
    try:
        return json.loads(storage.get(key))
    except (StorageError, ValueError):
        return {}


def write_state(storage: Storage, key: str, state: dict[str, Any]) -> None:
    """Store a heat map's state as JSON."""
    storage.put(key, json.dumps(state).encode(), "application/json")


def heatmap_state(storage: Storage, image: ImageRecord, model_version: str) -> dict[str, Any]:
    """Return {"state": "ready"|"pending"|"error"|"absent", ...} for an image's heatmap (no side effects)."""
    if storage.exists(heatmap_key(image, model_version)):
        return {"state": "ready"}
    state = read_state(storage, state_key(image, model_version))
    if state.get("state") == "error":
        return {"state": "error", "error": state.get("error", "the heatmap could not be computed")}
    if state.get("state") == "pending" and time.time() - float(state.get("at", 0)) < PENDING_SECONDS:
        return {"state": "pending"}
    return {"state": "absent"}


def request_heatmap(storage: Storage, image: ImageRecord, model_version: str, settings: Settings) -> dict[str, Any]:
    """Return the heatmap's state, sending one Grad-CAM task when none is cached or recently requested."""
    state = heatmap_state(storage, image, model_version)
    if state["state"] != "absent":
        return state
    from skinscan.broker import celery_for

    write_state(storage, state_key(image, model_version), {"state": "pending", "at": time.time()})
    try:
        celery_for(settings).send_task("worker.tasks.gradcam", args=[image.id, model_version], queue="skinscan")
    except Exception:
        storage.delete(state_key(image, model_version))  # not pending after all: the next request tries again
        raise
    log.info("Grad-CAM requested for image %s (model %s)", image.id, model_version)
    return {"state": "pending"}
