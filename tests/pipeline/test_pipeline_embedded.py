"""The same path in embedded mode: `skinscan serve` (SQLite, local folder, in-process Celery) and `skinscan submit`."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from realservices import ROOT, free_port, wait_port

pytestmark = [pytest.mark.slow]


def _env(tmp_path: Path, bundle: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "S3_BUCKET", "S3_ENDPOINT_URL", "SKINSCAN_ENV")}
    env.update({"SKINSCAN_DATA_DIR": str(tmp_path / "data"), "SKINSCAN_MODEL": str(bundle)})
    return env


def _cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "skinscan.cli", *args], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_embedded_serve_and_submit(tmp_path, service_bundle, isic_test_images):
    """A clinic key from the CLI, a folder uploaded in parts by `skinscan submit`, results CSV written."""
    env = _env(tmp_path, service_bundle)
    key = _cli(env, "clinics", "create", "Embedded Clinic").strip().splitlines()[-1]
    assert key.startswith("sk_")
    files, labels = isic_test_images(30)
    folder = tmp_path / "batch"
    (folder / "nested").mkdir(parents=True)
    for i, (name, data) in enumerate(files):
        (folder / ("nested" if i % 2 else "") / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "labels.csv").write_bytes(labels)

    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "skinscan.cli", "serve", "--port", str(port)], env=env,
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, timeout=120)
        assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()["status"] == "ok"
        out = tmp_path / "results.csv"
        _cli(env, "submit", str(folder), "--url", f"http://127.0.0.1:{port}", "--api-key", key,
             "--out", str(out), "--labels", str(tmp_path / "labels.csv"), "--part-files", "8")
        rows = list(csv.DictReader(out.open()))
        assert len(rows) == 30 and all(r["status"] == "scored" for r in rows)
        assert {r["filename"] for r in rows} == {n for n, _ in files}
        assert all(r["true_label"] in ("mel", "bkl", "nv") for r in rows)
        headers = {"Authorization": f"Bearer {key}"}
        jobs = requests.get(f"http://127.0.0.1:{port}/api/v1/jobs", headers=headers, timeout=10).json()["jobs"]
        assert len(jobs) == 1 and jobs[0]["status"] == "done"
        metrics = requests.get(f"http://127.0.0.1:{port}/api/v1/jobs/{jobs[0]['id']}/metrics", headers=headers,
                               timeout=10).json()["metrics"]
        assert metrics["n_images"] == 30 and "balanced_accuracy" in metrics
        # Everything lives under the one data directory.
        data = tmp_path / "data"
        assert (data / "skinscan.db").is_file() and len(list((data / "images").rglob("*.jpg"))) == 30
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
