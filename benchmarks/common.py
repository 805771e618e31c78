"""Shared pieces of the benchmarks: real images, the bundle, the machine, process memory and CPU (psutil)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HAM_IMAGES = DATA / "HAM10000" / "images"
ISIC_FOLDERS = [DATA / "ISIC2017" / name for name in
                ("ISIC-2017_Training_Data", "ISIC-2017_Validation_Data", "ISIC-2017_Test_v2_Data")]
for _path in (ROOT, ROOT / "tests" / "helpers"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

log = logging.getLogger("benchmarks")

class BenchmarkError(RuntimeError):
    """A benchmark that cannot run here (missing data, no GPU, a service that does not answer)."""


def image_paths(n: int) -> list[Path]:
    """Return n real dermoscopic JPEG paths, alternating HAM10000 and ISIC 2017 (repeating past both sets)."""
    ham = sorted(HAM_IMAGES.glob("*.jpg"))
    isic = sorted(p for folder in ISIC_FOLDERS for p in folder.glob("ISIC_*.jpg") if "superpixels" not in p.name)
    if not ham or not isic:
        raise BenchmarkError(f"real images not found under {DATA} (HAM10000/images and ISIC2017/*_Data)")
    mixed = [p for pair in zip(ham, isic, strict=False) for p in pair] + ham[len(isic):]
    return [mixed[i % len(mixed)] for i in range(n)]


def load_images(n: int) -> list[tuple[str, bytes]]:
    """Return n real images as (unique file name, JPEG bytes), HAM10000 and ISIC 2017 alternating."""
    out = []
    for i, path in enumerate(image_paths(n)):
        name = path.name if i < 12_000 else f"r{i}_{path.name}"
        out.append((name, path.read_bytes()))
    return out


def resolve_bundle(model: Path | None, cache: Path) -> Path:
    """Return the bundle to benchmark: --model, else the packaged default, else an untrained stand-in."""
    from skinscan.bundles import DEFAULT_BUNDLE_DIR

    if model is not None:
        return model.resolve()
    if (DEFAULT_BUNDLE_DIR / "metadata.json").is_file():
        return DEFAULT_BUNDLE_DIR
    out = cache / "bench-untrained"
    if not (out / "metadata.json").is_file():
        from training.export import create_model, save_bundle

        log.warning("no default bundle yet: building an untrained tf_efficientnet_lite0 (same size and speed) in %s",
                    out)
        save_bundle(create_model("tf_efficientnet_lite0", 7), out, {
            "architecture": "tf_efficientnet_lite0", "version": "bench-untrained", "input_size": 160,
            "resize_size": 160, "mean": [0.5] * 3, "std": [0.5] * 3, "temperature": 1.0})
    return out


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Return the CPU, memory, GPU and software versions of this machine."""
    import torch

    cpu_model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    flags = ""
    if cpuinfo.is_file():
        flags = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "")
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "cpu_avx512": "avx512f" in flags, "cpu_avx512_bf16": "avx512_bf16" in flags, "cpu_amx": "amx_bf16" in flags,
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "gpus": gpus,
        "cuda": torch.version.cuda if gpus else None,
        "load_average_at_start": list(os.getloadavg()),
        "benchmark_nice": os.nice(0),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("skinscan", "torch", "torchvision", "onnxruntime", "numpy", "pillow",
                                              "celery", "kombu", "flask", "werkzeug", "gunicorn", "sqlalchemy",
                                              "psycopg", "boto3", "moto", "redis")},
    }


def tree_pids(root: int) -> list[int]:
    """Return a process and all its descendants."""
    try:
        return [root] + [child.pid for child in psutil.Process(root).children(recursive=True)]
    except psutil.Error:
        return [root]


_PROCESSES: dict[int, psutil.Process] = {}  # kept between samples: psutil reads a process's start once


def _vm_hwm_kb(pid: int) -> int | None:
    """The kernel's peak RSS of a process (VmHWM) in kB: psutil reports the current RSS, not this."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("VmHWM:")), None)


def sample_process(pid: int, pss: bool = False) -> dict[str, float] | None:
    """One reading of a process: RSS and peak RSS in kB, user + system CPU seconds, and (pss=True) its
    proportional set size in kB (shared pages split between their users); None when it is gone."""
    try:
        proc = _PROCESSES.get(pid) or _PROCESSES.setdefault(pid, psutil.Process(pid))
        with proc.oneshot():
            rss_kb = proc.memory_info().rss // 1024
            times = proc.cpu_times()
        out: dict[str, float] = {"rss_kb": rss_kb, "cpu_s": times.user + times.system}
        if pss:
            try:
                out["pss_kb"] = proc.memory_full_info().pss // 1024
            except psutil.AccessDenied:  # another user's process: its RSS still counts
                out["pss_kb"] = 0
    except psutil.Error:
        _PROCESSES.pop(pid, None)
        return None
    out["hwm_kb"] = _vm_hwm_kb(pid) or rss_kb
    return out


def postgres_backends(database: str) -> list[int]:
    """Return the pids of PostgreSQL backends serving one database (their titles name it)."""
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if title.startswith("postgres: ") and f" {database} " in title:
            pids.append(proc.pid)
    return pids


class ProcessMonitor:
    """Samples groups of processes in a thread: peak summed RSS (and PSS, every 10th sample), each process's
    VmHWM, CPU seconds used."""

    def __init__(self, groups: dict[str, Callable[[], Iterable[int]]], interval: float = 0.1,
                 pss: bool = True) -> None:
        self.groups = groups
        self.interval = interval
        self.pss = pss
        self.peak_sum_kb: dict[str, int] = dict.fromkeys(groups, 0)
        self.peak_pss_kb: dict[str, int] = dict.fromkeys(groups, 0)
        self._samples = 0
        self.hwm_kb: dict[str, dict[int, int]] = {g: {} for g in groups}
        self._cpu_first: dict[str, dict[int, float]] = {g: {} for g in groups}
        self._cpu_last: dict[str, dict[int, float]] = {g: {} for g in groups}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="monitor", daemon=True)

    def __enter__(self) -> ProcessMonitor:
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self, first: bool = False) -> None:
        self._samples += 1
        for group, pids_of in self.groups.items():
            total = pss_total = 0
            with_pss = self.pss and self._samples % 10 == 1
            for pid in list(pids_of()):
                reading = sample_process(pid, pss=with_pss)
                if reading is None:
                    continue
                total += int(reading["rss_kb"])
                pss_total += int(reading.get("pss_kb", 0))
                self.hwm_kb[group][pid] = max(self.hwm_kb[group].get(pid, 0), int(reading["hwm_kb"]))
                self._cpu_first[group].setdefault(pid, reading["cpu_s"] if first else 0.0)
                self._cpu_last[group][pid] = reading["cpu_s"]
            self.peak_sum_kb[group] = max(self.peak_sum_kb[group], total)
            self.peak_pss_kb[group] = max(self.peak_pss_kb[group], pss_total)

    def cpu_seconds(self, group: str) -> float:
        """CPU seconds a group used while monitored (processes that ended count up to their last sample)."""
        first, last = self._cpu_first[group], self._cpu_last[group]
        return round(sum(last[p] - first.get(p, 0.0) for p in last), 2)

    def report(self, group: str) -> dict[str, Any]:
        """Peak RSS figures of one group in MB: summed over its processes, and the largest single process."""
        hwm = self.hwm_kb[group]
        return {"peak_rss_sum_mb": round(self.peak_sum_kb[group] / 1024, 1),
                "peak_pss_sum_mb": round(self.peak_pss_kb[group] / 1024, 1),
                "max_process_hwm_mb": round(max(hwm.values(), default=0) / 1024, 1),
                "sum_process_hwm_mb": round(sum(hwm.values()) / 1024, 1),
                "processes": len(hwm), "cpu_s": self.cpu_seconds(group)}


class Timer:
    """Wall-clock seconds of a with-block."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self.start


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (0..100) by linear interpolation (NaN for no values)."""
    return float(np.percentile(values, q)) if len(values) else float("nan")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write results as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    """Print a three-column table (figure, value, note) to stdout: the benchmark's one output."""
    width = max([len(r[0]) for r in rows] + [10])
    vwidth = max([len(r[1]) for r in rows] + [8])
    lines = [title, "-" * len(title)] + [f"{a:<{width}}  {b:>{vwidth}}  {c}" for a, b, c in rows]
    print("\n".join(lines), flush=True)  # noqa: T201 - the benchmark's result table
