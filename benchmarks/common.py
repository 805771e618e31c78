"""Shared pieces of the benchmarks: real images, the bundle, the machine, process memory and CPU from /proc."""

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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HAM_IMAGES = DATA / "HAM10000" / "images"
ISIC_FOLDERS = [DATA / "ISIC2017" / name for name in
                ("ISIC-2017_Training_Data", "ISIC-2017_Validation_Data", "ISIC-2017_Test_v2_Data")]
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

log = logging.getLogger("benchmarks")

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


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
        from training.bundle import create_model, save_bundle

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
    mem_kb = 0
    if Path("/proc/meminfo").is_file():
        mem_kb = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "cpu_avx512": "avx512f" in flags, "cpu_avx512_bf16": "avx512_bf16" in flags, "cpu_amx": "amx_bf16" in flags,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
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
    """Return a process and all its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def proc_status(pid: int) -> dict[str, int]:
    """Return VmRSS and VmHWM of a process in kB (empty when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    return out


def proc_pss_kb(pid: int) -> int:
    """Return a process's proportional set size in kB (shared pages split between their users), 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def proc_cpu_seconds(pid: int) -> float | None:
    """Return user + system CPU seconds a process has used (None when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def postgres_backends(database: str) -> list[int]:
    """Return the pids of PostgreSQL backends serving one database (their titles name it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if cmd.startswith(b"postgres: ") and f" {database} ".encode() in cmd:
            pids.append(int(entry.name))
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
            total = 0
            pids = list(pids_of())
            if self.pss and self._samples % 10 == 1:
                self.peak_pss_kb[group] = max(self.peak_pss_kb[group], sum(proc_pss_kb(p) for p in pids))
            for pid in pids:
                status = proc_status(pid)
                if not status:
                    continue
                total += status.get("VmRSS", 0)
                self.hwm_kb[group][pid] = max(self.hwm_kb[group].get(pid, 0), status.get("VmHWM", 0))
                cpu = proc_cpu_seconds(pid)
                if cpu is not None:
                    self._cpu_first[group].setdefault(pid, cpu if first else 0.0)
                    self._cpu_last[group][pid] = cpu
            self.peak_sum_kb[group] = max(self.peak_sum_kb[group], total)

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
    """Return the q-th percentile (0..100) by linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


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
