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


def test_embedded_serve_and_submit(tmp_path, service_bundle, isic_test_images, isic2017_dir):
    """A clinic key from the CLI, `skinscan serve` saying how to sign in, a folder uploaded in parts by
    `skinscan submit` (key from SKINSCAN_API_KEY, a batch name, the whole ISIC 2017 test ground truth for 30 of its
    images, a file that is no image), results CSV written and a summary that counts it all."""
    env = _env(tmp_path, service_bundle)
    created = _cli(env, "clinics", "create", "Embedded Clinic").strip().splitlines()[-1]
    assert created.startswith("API key: sk_")
    key = created.removeprefix("API key: ")
    files, _ = isic_test_images(30)
    folder = tmp_path / "batch"
    (folder / "nested").mkdir(parents=True)
    for i, (name, data) in enumerate(files):
        (folder / ("nested" if i % 2 else "") / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"not a picture either")
    (folder / "metadata.csv").write_text("image_id,age_approximate,sex\n")
    truth = isic2017_dir / "ISIC-2017_Test_v2_Part3_GroundTruth.csv"  # 600 rows, 30 of them for this batch

    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "skinscan.cli", "serve", "--port", str(port)], env=env,
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, timeout=120)
        assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()["status"] == "ok"
        out = tmp_path / "results.csv"
        done = subprocess.run(
            [sys.executable, "-m", "skinscan.cli", "submit", str(folder), "--url", f"127.0.0.1:{port}/api/v1",
             "--out", str(out), "--labels", str(truth), "--part-files", "8", "--name", "Embedded batch"],
            env={**env, "SKINSCAN_API_KEY": key}, cwd=ROOT, capture_output=True, text=True, timeout=300,
            stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"not uploading {folder / 'metadata.csv'}: CSV files are not images" in done.stderr
        rows = list(csv.DictReader(out.open()))
        scored = [r for r in rows if r["status"] == "scored"]
        assert len(scored) == 30 and {r["filename"] for r in scored} == {n for n, _ in files}
        assert [(r["filename"], r["status"]) for r in rows if r not in scored] == [("broken.jpg", "failed")]
        assert all(r["true_label"] in ("mel", "bkl", "nv") for r in scored)
        headers = {"Authorization": f"Bearer {key}"}
        jobs = requests.get(f"http://127.0.0.1:{port}/api/v1/jobs", headers=headers, timeout=10).json()["jobs"]
        assert len(jobs) == 1 and jobs[0]["status"] == "done"
        job_id = jobs[0]["id"]
        flagged = sum(1 for r in scored if r["flagged"] in ("1", "True", "true"))
        summary = done.stdout.strip().splitlines()
        assert summary[0] == f"Job {job_id} (Embedded batch): done"
        assert summary[1].split() == ["images", "accepted:", "30", "scored:", "30", "not", "scored:", "0", "flagged",
                                      "for", "review:", str(flagged)]
        assert "files refused at upload: 1" in summary[2] and summary[3].strip().startswith("broken.jpg: ")
        assert summary[4].strip() == "labels: 30 images labelled; 570 label rows matched no uploaded image."
        assert summary[-1].strip() == f"job page: http://127.0.0.1:{port}/jobs/{job_id}"
        assert len(summary) <= 10
        metrics = requests.get(f"http://127.0.0.1:{port}/api/v1/jobs/{job_id}/metrics", headers=headers,
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
    said = (tmp_path / "serve.log").read_text()
    assert f"SkinScan running at http://127.0.0.1:{port}/" in said
    assert 'No web user exists yet' in said and 'skinscan users create "Embedded Clinic" you@example.org' in said
    assert "superuser privileges" not in said and "Context impl" not in said and "Running upgrade" not in said
