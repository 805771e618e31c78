"""Scoring images with a model bundle: fetch and decode in threads while the network runs, in batches."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skinscan.imaging import ImageError, decode_rgb
from skinscan.labels import MALIGNANT
from skinscan.storage import Storage, StorageError
from training.bundle import Bundle, load_bundle

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """The outcome for one image: class probabilities, or the reason it could not be scored."""

    image_id: str
    probabilities: dict[str, float] | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        """Predicted class (highest probability)."""
        assert self.probabilities is not None
        return max(self.probabilities, key=self.probabilities.__getitem__)


class Scorer:
    """A model bundle loaded once, with its predictor and preprocessing, ready to score batches."""

    def __init__(self, bundle: Bundle, backend: str = "auto", threads: int = 0, batch_size: int = 32,
                 decode_workers: int = 0) -> None:
        from training.predictor import load_predictor

        self.bundle = bundle
        self.batch_size = batch_size
        self.predictor = load_predictor(bundle, backend=backend, threads=threads or None)
        self.decode_workers = decode_workers or min(4, os.cpu_count() or 1)
        referral = bundle.meta.get("referral", {})
        self.threshold = float(referral.get("malignancy_threshold", 0.5))
        self.uncertain_below = float(referral.get("uncertain_below", 0.5))
        self._pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode")

    @property
    def version(self) -> str:
        """The bundle version every prediction is tagged with."""
        return self.bundle.version

    def malignancy(self, probs: dict[str, float]) -> float:
        """Return the summed probability of malignant classes."""
        return float(sum(p for c, p in probs.items() if c in MALIGNANT))

    def flagged(self, probs: dict[str, float]) -> bool:
        """Refer when the malignancy score passes the bundle's threshold or the model is unsure."""
        return self.malignancy(probs) >= self.threshold or max(probs.values()) < self.uncertain_below

    def _prepare(self, data: bytes) -> np.ndarray:
        img = decode_rgb(data, draft_size=self.bundle.resize_size)
        return np.asarray(self.bundle.resize_crop(img))

    def _load(self, storage: Storage, key: str) -> np.ndarray | ImageError:
        try:
            data = storage.get(key)
        except StorageError:
            raise
        try:
            return self._prepare(data)
        except ImageError as exc:
            return exc

    def score_bytes(self, items: Iterable[tuple[str, bytes]]) -> list[Scored]:
        """Score images given as (id, encoded bytes)."""
        items = list(items)
        prepared = self._pool.map(lambda it: self._safe_prepare(it[1]), items)
        return list(self._run(((i, p) for (i, _), p in zip(items, prepared, strict=True))))

    def _safe_prepare(self, data: bytes) -> np.ndarray | ImageError:
        try:
            return self._prepare(data)
        except ImageError as exc:
            return exc

    def score_stored(self, storage: Storage, items: Iterable[tuple[str, str]]) -> list[Scored]:
        """Score images given as (id, storage key); storage errors propagate so the task can retry."""
        items = list(items)
        prepared = self._pool.map(lambda it: self._load(storage, it[1]), items)
        return list(self._run(((i, p) for (i, _), p in zip(items, prepared, strict=True))))

    def _run(self, prepared: Iterator[tuple[str, np.ndarray | ImageError]]) -> Iterator[Scored]:
        batch_ids: list[str] = []
        batch: list[np.ndarray] = []
        for image_id, item in prepared:
            if isinstance(item, ImageError):
                yield Scored(image_id, error=str(item))
                continue
            batch_ids.append(image_id)
            batch.append(item)
            if len(batch) == self.batch_size:
                yield from self._predict(batch_ids, batch)
                batch_ids, batch = [], []
        if batch:
            yield from self._predict(batch_ids, batch)

    def _predict(self, ids: list[str], batch: list[np.ndarray]) -> Iterator[Scored]:
        probs = self.predictor.predict(self.bundle.normalize(np.stack(batch)))
        classes = self.bundle.classes
        for image_id, row in zip(ids, probs, strict=True):
            yield Scored(image_id, {c: round(float(p), 6) for c, p in zip(classes, row, strict=True)})


_SCORERS: dict[str, Scorer] = {}
_LOCK = threading.Lock()


def get_scorer(path: Path, backend: str = "auto", threads: int = 0, batch_size: int = 32,
               decode_workers: int = 0) -> Scorer:
    """Return this process's scorer for a bundle folder, loading it on first use only."""
    key = str(Path(path).resolve())
    with _LOCK:
        if key not in _SCORERS:
            bundle = load_bundle(path)
            _SCORERS[key] = Scorer(bundle, backend, threads, batch_size, decode_workers)
            log.info("loaded model %s (%s) in process %d", bundle.version, _SCORERS[key].predictor, os.getpid())
        return _SCORERS[key]
