"""Sections 1 and 2: the model's ceiling (forward passes only) and the compute ceiling (decode + model), on CPU.

Each measurement runs P processes at once (spawned, each with T compute threads), started together at a barrier;
the figure is the images all of them finished divided by the wall time of the slowest.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("benchmarks.ceilings")


def _limit_threads(threads: int) -> None:
    """Keep every maths library in this process to the given number of threads."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _model_worker(bundle_path: str, backend: str, threads: int, batch: int, seconds: float,
                  barrier: Any, queue: Any) -> None:
    """Forward passes on one in-memory batch for a fixed time; put (images, seconds) on the queue."""
    _limit_threads(threads)
    from skinscan.model.bundle import load_bundle
    from skinscan.model.predictor import load_predictor

    bundle = load_bundle(bundle_path, verify=False)
    predictor = load_predictor(bundle, backend=backend, device="cpu", threads=threads)
    size = bundle.input_size
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    for _ in range(2):
        predictor.predict(x)
    barrier.wait()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        predictor.predict(x)
        done += batch
    queue.put((done, time.perf_counter() - start))


def _compute_worker(bundle_path: str, backend: str, threads: int, batch: int, seconds: float,
                    images: list[bytes], barrier: Any, queue: Any) -> None:
    """Decode, preprocess and score in-memory JPEG bytes in one loop for a fixed time; put (images, seconds)."""
    _limit_threads(threads)
    from skinscan.model.bundle import load_bundle
    from skinscan.model.scorer import Scorer

    bundle = load_bundle(bundle_path, verify=False)
    scorer = Scorer(bundle, backend=backend, threads=threads, batch_size=batch, decode_workers=1)
    i = 0

    def next_batch() -> list[np.ndarray]:
        nonlocal i
        out = []
        for _ in range(batch):
            out.append(scorer.prepare(images[i % len(images)]))
            i += 1
        return out

    scorer.predict_batch(next_batch())
    barrier.wait()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        scorer.predict_batch(next_batch())
        done += batch
    queue.put((done, time.perf_counter() - start))


def _run_parallel(target: Any, procs: int, args: tuple[Any, ...]) -> float:
    """Run target in procs spawned processes started together; return their summed images per second."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    queue = ctx.Queue()
    workers = [ctx.Process(target=target, args=(*args, barrier, queue), daemon=True) for _ in range(procs)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=900) for _ in workers]
    for w in workers:
        w.join(60)
    slowest = max(s for _, s in results)
    return round(sum(n for n, _ in results) / slowest, 1)


def layouts(cores: int) -> list[tuple[int, int]]:
    """Process x thread layouts worth trying on this many cores: one thread per process first."""
    out = [(cores, 1)]
    if cores > 1:
        out.append((1, cores))
    return out


def model_ceiling(bundle: Path, backend: str, batch_sizes: list[int], seconds: float,
                  layout_list: list[tuple[int, int]]) -> dict[str, Any]:
    """Section 1 for one backend: images/s of forward passes by layout and batch size, and the best."""
    grid: dict[str, dict[str, float]] = {}
    best: dict[str, Any] = {"img_s": 0.0}
    for procs, threads in layout_list:
        name = f"{procs}x{threads}"
        grid[name] = {}
        for batch in batch_sizes:
            rate = _run_parallel(_model_worker, procs, (str(bundle), backend, threads, batch, seconds))
            grid[name][str(batch)] = rate
            log.info("model ceiling %s %s batch %d: %.1f img/s", backend, name, batch, rate)
            if rate > best["img_s"]:
                best = {"img_s": rate, "processes": procs, "threads": threads, "batch": batch}
    return {"backend": backend, "best": best, "grid": grid}


def compute_ceiling(bundle: Path, backend: str, batch: int, procs: int, threads: int, seconds: float,
                    images: list[bytes]) -> dict[str, Any]:
    """Section 2: decode + preprocess + forward of in-memory JPEG bytes on every core, images/s."""
    rate = _run_parallel(_compute_worker, procs, (str(bundle), backend, threads, batch, seconds, images))
    log.info("compute ceiling %s %dx%d batch %d: %.1f img/s", backend, procs, threads, batch, rate)
    return {"img_s": rate, "backend": backend, "processes": procs, "threads": threads, "batch": batch}
