"""Client-side load: status pollers (section 6) and the one-request-per-image driver of the baseline (section 5)."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from benchmarks.common import BenchmarkError, percentile

log = logging.getLogger("benchmarks.load")


class Pollers:
    """n clients each polling a job's status every interval seconds (staggered), recording latency in ms."""

    def __init__(self, url: str, key: str, job_id: str, n: int = 50, interval: float = 1.0) -> None:
        self.url = f"{url.rstrip('/')}/api/v1/jobs/{job_id}"
        self.key, self.n, self.interval = key, n, interval
        self.latencies_ms: list[float] = []
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll, args=(i,), daemon=True, name=f"poller{i}")
                         for i in range(n)]

    def _poll(self, i: int) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.key}"
        next_at = time.monotonic() + self.interval * i / self.n
        while not self._stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            next_at += self.interval
            start = time.perf_counter()
            try:
                ok = session.get(self.url, timeout=30).status_code == 200
            except requests.RequestException:
                ok = False
            elapsed = (time.perf_counter() - start) * 1000
            with self._lock:
                if ok:
                    self.latencies_ms.append(elapsed)
                else:
                    self.errors += 1

    def __enter__(self) -> Pollers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def summary(self) -> dict[str, Any]:
        """Number of polls, errors, p50/p99/max latency in ms."""
        lat = self.latencies_ms
        return {"pollers": self.n, "interval_s": self.interval, "polls": len(lat), "errors": self.errors,
                "p50_ms": round(percentile(lat, 50), 1), "p99_ms": round(percentile(lat, 99), 1),
                "max_ms": round(max(lat, default=float("nan")), 1)}


def drive_single_image(url: str, images: list[tuple[str, bytes]], concurrency: int) -> dict[str, Any]:
    """POST each image on its own to url with concurrency clients; return images/s and latency."""
    local = threading.local()
    latencies: list[float] = []
    lock = threading.Lock()

    def post(item: tuple[str, bytes]) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        start = time.perf_counter()
        resp = local.session.post(url, data=item[1], headers={"Content-Type": "image/jpeg"}, timeout=300)
        if resp.status_code != 200:
            raise BenchmarkError(f"baseline answered {resp.status_code} for {item[0]}: {resp.text[:300]}")
        with lock:
            latencies.append((time.perf_counter() - start) * 1000)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, images))
    seconds = time.perf_counter() - start
    return {"images": len(images), "seconds": round(seconds, 2), "img_s": round(len(images) / seconds, 1),
            "concurrency": concurrency, "p50_ms": round(percentile(latencies, 50), 1),
            "p99_ms": round(percentile(latencies, 99), 1)}
