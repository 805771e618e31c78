"""`skinscan submit`: upload a folder of images to a SkinScan server in parts, follow the job, save results."""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

log = logging.getLogger(__name__)

UPLOAD_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".zip")


class SubmitError(RuntimeError):
    """The server refused the upload or the job failed."""


def find_images(folder: Path) -> list[Path]:
    """Return the image (and zip) files below a folder, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in UPLOAD_SUFFIXES)


def _parts(paths: list[Path], max_files: int, max_bytes: int) -> list[list[Path]]:
    parts: list[list[Path]] = [[]]
    size = 0
    for p in paths:
        n = p.stat().st_size
        if parts[-1] and (len(parts[-1]) >= max_files or size + n > max_bytes):
            parts.append([])
            size = 0
        parts[-1].append(p)
        size += n
    return [p for p in parts if p]


def _check(resp: requests.Response) -> dict[str, Any]:
    if resp.status_code >= 400:
        try:
            body = resp.json()
            message = body.get("error", resp.text)
            details = body.get("details")
        except ValueError:
            message, details = resp.text[:500], None
        raise SubmitError(f"server answered {resp.status_code}: {message}" + (f" {details}" if details else ""))
    return resp.json()


def _post_files(session: requests.Session, url: str, paths: list[Path], data: dict[str, str]) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        files = [("files", (p.name, stack.enter_context(p.open("rb")))) for p in paths]
        return _check(session.post(url, files=files, data=data, timeout=600))


def submit(
    folder: Path, url: str, api_key: str, out: Path, labels: Path | None = None, part_files: int = 200,
    part_bytes: int = 100 * 1024 * 1024, poll_seconds: float = 1.0, timeout: float = 24 * 3600,
) -> dict[str, Any]:
    """Upload every image below folder as one job, wait for it, write the results CSV; return the job."""
    paths = find_images(folder)
    if not paths:
        raise SubmitError(f"no images (.jpg, .png, .bmp, .tif or .zip) found below {folder}")
    base = url.rstrip("/")
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {api_key}"
    parts = _parts(paths, part_files, part_bytes)
    rejected: list[dict[str, Any]] = []
    with tqdm(total=len(paths), desc="uploading", unit="file") as bar:
        first = _post_files(session, f"{base}/api/v1/jobs", parts[0], {"finalize": "false"})
        job_id = first["id"]
        rejected += first.get("rejected", [])
        bar.update(len(parts[0]))
        for part in parts[1:]:
            body = _post_files(session, f"{base}/api/v1/jobs/{job_id}/images", part, {})
            rejected += body.get("rejected", [])
            bar.update(len(part))
    for r in rejected:
        log.warning("refused %s: %s", r.get("filename"), r.get("error"))
    with contextlib.ExitStack() as stack:
        files = {"labels": (labels.name, stack.enter_context(labels.open("rb")))} if labels else None
        job = _check(session.post(f"{base}/api/v1/jobs/{job_id}/start", files=files, timeout=120))
    deadline = time.monotonic() + timeout
    with tqdm(total=job["counts"]["total"], desc="scoring", unit="img") as bar:
        while True:
            job = _check(session.get(f"{base}/api/v1/jobs/{job_id}", timeout=30))
            done = job["counts"]["scored"] + job["counts"]["failed"]
            bar.update(done - bar.n)
            if job["status"] in ("done", "failed"):
                break
            if time.monotonic() > deadline:
                raise SubmitError(f"job {job_id} not finished after {timeout:.0f} s")
            time.sleep(poll_seconds)
    resp = session.get(f"{base}/api/v1/jobs/{job_id}/results", params={"format": "csv"}, timeout=600, stream=True)
    if resp.status_code >= 400:
        _check(resp)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as fh:
        for block in resp.iter_content(1 << 16):
            fh.write(block)
    log.info("job %s %s: %d scored, %d failed; results in %s", job_id, job["status"], job["counts"]["scored"],
             job["counts"]["failed"], out)
    if job["status"] == "failed":
        raise SubmitError(f"job {job_id} failed: {job.get('error')}")
    return job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `skinscan submit` options and handler to a parser."""
    parser.add_argument("folder", type=Path)
    parser.add_argument("--url", required=True, help="server address, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--out", type=Path, required=True, help="results CSV to write")
    parser.add_argument("--labels", type=Path, default=None, help="ground-truth CSV (HAM10000 or ISIC format)")
    parser.add_argument("--part-files", type=int, default=200, help="files per upload request")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        submit(args.folder, args.url, args.api_key, args.out, args.labels, part_files=args.part_files)
    except (SubmitError, requests.RequestException) as exc:
        log.error("%s", exc)
        return 1
    return 0
