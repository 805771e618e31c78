"""Scoring images with a model bundle: fetch and decode in threads while the network runs, in batches."""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skinscan.imaging import ImageError, decode_rgb
from skinscan.model.bundle import Bundle, load_bundle
from skinscan.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """The outcome for one image: class probabilities, or the reason it could not be scored."""

    image_id: str
    probabilities: dict[str, float] | None = None
    error: str | None = None
    decision: str | None = None  # the bundle's decision rule's class (None: the highest probability)
    heatmap: list[list[float]] | None = None  # Grad-CAM grid (0..1) of the decided class, when the bundle has one

    @property
    def label(self) -> str:
        """Predicted class: the bundle's decision (class-prior corrected arg-max), else the highest probability."""
        assert self.probabilities is not None
        return self.decision or max(self.probabilities, key=self.probabilities.__getitem__)


class Scorer:
    """A model bundle loaded once, with its predictor and preprocessing, ready to score batches.

    Fetching and decoding run in a thread pool ahead of the network (Pillow and the storage client release the
    GIL), so one batch is decoded while the previous one runs; batch size and decode threads default to what
    benchmarks/throughput.py measured best for the backend and device.
    """

    def __init__(self, bundle: Bundle, backend: str = "auto", threads: int = 0, batch_size: int = 0,
                 decode_workers: int = 0, device: str = "auto", referral_sensitivity: float | None = None) -> None:
        from skinscan.model.predictor import available_cores, load_predictor

        self.bundle = bundle
        self.predictor = load_predictor(bundle, backend=backend, device=_worker_device(device),
                                        threads=threads or None)
        self.batch_size = batch_size or self.predictor.batch_size
        # On a GPU decoding is the bottleneck: every core decodes. On a CPU the network takes most of the time;
        # a few threads keep the next batch fetched and decoded while storage reads wait on the network.
        on_gpu = self.predictor.device.type == "cuda"
        self.decode_workers = decode_workers or (available_cores() if on_gpu else min(4, available_cores()))
        referral = bundle.meta.get("referral", {})
        self.threshold = bundle.referral_threshold(referral_sensitivity)
        self.malignant_classes = frozenset(bundle.malignant_classes)
        self.uncertain_below = float(referral.get("uncertain_below", 0.5))
        self._pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode")

    @property
    def version(self) -> str:
        """The bundle version every prediction is tagged with."""
        return self.bundle.version

    def malignancy(self, probs: dict[str, float]) -> float:
        """Return the summed probability of the bundle's malignant classes."""
        return float(sum(p for c, p in probs.items() if c in self.malignant_classes))

    def flagged(self, probs: dict[str, float]) -> bool:
        """Refer when the malignancy score passes the bundle's threshold or the model is unsure."""
        return self.malignancy(probs) >= self.threshold or max(probs.values()) < self.uncertain_below

    def prepare(self, data: bytes) -> np.ndarray:
        """Decode encoded image bytes into the S x S x 3 uint8 crop the network takes (raises ImageError)."""
        img = decode_rgb(data, draft_size=self.bundle.resize_size)
        return np.asarray(self.bundle.resize_crop(img))

    def predict_batch(self, batch: list[np.ndarray]) -> np.ndarray:
        """Return N x C probabilities of prepared crops (normalised on the GPU when there is one)."""
        return self.predictor.predict_images(np.stack(batch))

    def predict_batch_features(self, batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Return N x C probabilities of prepared crops and their last feature maps (None without them)."""
        return self.predictor.predict_images_features(np.stack(batch))

    def _load(self, storage: Storage, key: str) -> np.ndarray | ImageError:
        data = storage.get(key)  # StorageError propagates: the task retries
        return self._safe_prepare(data)

    def _safe_prepare(self, data: bytes) -> np.ndarray | ImageError:
        try:
            return self.prepare(data)
        except ImageError as exc:
            return exc

    def score_bytes(self, items: Iterable[tuple[str, bytes]]) -> list[Scored]:
        """Score images given as (id, encoded bytes)."""
        items = list(items)
        return list(self._run([i for i, _ in items], [lambda d=d: self._safe_prepare(d) for _, d in items]))

    def score_stored(self, storage: Storage, items: Iterable[tuple[str, str]]) -> list[Scored]:
        """Score images given as (id, storage key); storage errors propagate so the task can retry."""
        items = list(items)
        return list(self._run([i for i, _ in items], [lambda k=k: self._load(storage, k) for _, k in items]))

    def _run(self, ids: list[str], loaders: list[Callable[[], np.ndarray | ImageError]]) -> Iterator[Scored]:
        """Load in the pool, at most two batches ahead of the network, and predict batch by batch in order."""
        ahead = max(2 * self.batch_size, self.decode_workers)
        futures: deque[Future[np.ndarray | ImageError]] = deque()
        pending = iter(loaders)
        batch_ids: list[str] = []
        batch: list[np.ndarray] = []
        try:
            for image_id in ids:
                while len(futures) < ahead and (loader := next(pending, None)) is not None:
                    futures.append(self._pool.submit(loader))
                item = futures.popleft().result()
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
        finally:
            for future in futures:
                future.cancel()

    def _predict(self, ids: list[str], batch: list[np.ndarray]) -> Iterator[Scored]:
        probs, feats = self.predict_batch_features(batch)
        classes = self.bundle.classes
        decisions = self.bundle.decide(probs)
        for i, (image_id, row, d) in enumerate(zip(ids, probs, decisions, strict=True)):
            grid = None if feats is None else self.bundle.heatmap_grid(feats[i], int(d))
            yield Scored(image_id, {c: round(float(p), 6) for c, p in zip(classes, row, strict=True)}, None,
                         classes[int(d)], None if grid is None else np.round(grid, 5).tolist())


def _worker_device(device: str) -> str:
    """With several GPUs, give each worker process its own: pool process i takes GPU i modulo the count."""
    from skinscan.model.predictor import torch_installed

    if device != "auto" or not torch_installed():
        return device
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count <= 1:
        return device
    from celery.utils.log import current_process_index

    return f"cuda:{(current_process_index(base=0) or 0) % count}"


_SCORERS: dict[str, Scorer] = {}
_LOCK = threading.Lock()


def get_scorer(path: Path, backend: str = "auto", threads: int = 0, batch_size: int = 0,
               decode_workers: int = 0, referral_sensitivity: float | None = None) -> Scorer:
    """Return this process's scorer for a bundle folder, loading it on first use only."""
    key = str(Path(path).resolve())
    with _LOCK:
        if key not in _SCORERS:
            bundle = load_bundle(path)
            _SCORERS[key] = Scorer(bundle, backend, threads, batch_size, decode_workers,
                                   referral_sensitivity=referral_sensitivity)
            log.info("loaded model %s (%s) in process %d", bundle.version, _SCORERS[key].predictor, os.getpid())
        return _SCORERS[key]
