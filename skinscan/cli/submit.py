"""`skinscan submit`: upload a folder of images to a SkinScan server in parts, follow the job, save results.

Exit codes: 0 the job was scored; 1 the job failed or the server refused it; 2 bad input here (folder, labels
file, options); 3 no server at the address, or it refused the API key.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skinscan.jobs.counts import JobCounts

if TYPE_CHECKING:  # requests and tqdm are imported when a submit runs, not for every `skinscan` command
    import requests

log = logging.getLogger(__name__)

UPLOAD_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".zip")
API_PREFIX = "/api/v1"
DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_SERVER = 0, 1, 2, 3


class SubmitError(RuntimeError):
    """The server refused the upload or the job failed; carries the exit code to end with."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        self.code = code
        super().__init__(message)


@dataclass
class Summary:
    """What a submit did, for the closing summary."""

    job_id: str = ""
    status: str = ""
    name: str | None = None
    accepted: int = 0
    refused: list[dict[str, Any]] = field(default_factory=list)  # those this run was told of
    refused_count: int = 0  # all of the job's (a resumed job's earlier parts included)
    scored: int = 0
    not_scored: int = 0
    flagged: int | None = None
    labels: dict[str, Any] | None = None
    error: str | None = None
    results: Path | None = None
    job_url: str = ""
    uploading: bool = False  # the job exists and its upload is not finished

    def lines(self) -> list[str]:
        """The summary, a few lines long (refused files: the first five, then a count)."""
        title = f"Job {self.job_id}" + (f" ({self.name})" if self.name else "") + f": {self.status}"
        out = [title, f"  images accepted: {self.accepted:,}   scored: {self.scored:,}   "
                      f"not scored: {self.not_scored:,}"
               + ("" if self.flagged is None else f"   flagged for review: {self.flagged:,}")]
        refused = max(self.refused_count, len(self.refused))
        if refused:
            out.append(f"  files refused at upload: {refused:,}")
            out += [f"    {r.get('filename')}: {r.get('error')}" for r in self.refused[:5]]
            if refused > min(5, len(self.refused)):
                out.append(f"    …and {refused - min(5, len(self.refused)):,} more (listed in the results CSV)")
        if self.labels:
            out.append(f"  labels: {self.labels.get('labels_summary')}")
        if self.error:
            out.append(f"  error: {self.error}")
        if self.results:
            out.append(f"  results: {self.results}")
        out.append(f"  job page: {self.job_url}")
        return out


def normalise_url(url: str) -> tuple[str, str | None]:
    """Return (server base URL, note): adds http:// when no scheme is given, accepts a URL ending in /api/v1."""
    text = url.strip()
    note = None
    if not text:
        raise SubmitError("--url is empty; give the server's address, e.g. http://127.0.0.1:8000", EXIT_INPUT)
    if "://" not in text:
        text, note = "http://" + text, f"no http:// or https:// in --url {url!r}: using "
    scheme = text.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise SubmitError(f"--url {url!r} must start with http:// or https://", EXIT_INPUT)
    if not text.split("://", 1)[1].strip("/"):
        raise SubmitError(f"--url {url!r} names no host", EXIT_INPUT)
    base = text.rstrip("/")
    if base.lower().endswith(API_PREFIX):
        base = base[: -len(API_PREFIX)].rstrip("/")
    return base, (f"{note}{base}" if note else None)


def find_images(folder: Path) -> list[Path]:
    """Return the image (and zip) files below a folder, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in UPLOAD_SUFFIXES)


def skip_reason(path: Path, labels: Path | None) -> str | None:
    """Why a file is not uploaded (None: it is uploaded): only images and zips of them are."""
    suffix = path.suffix.lower()
    if suffix in UPLOAD_SUFFIXES:
        return None
    if suffix == ".csv":
        if labels is not None and path.resolve() == labels.resolve():
            return ""  # the labels file: sent with the job, not as an image (nothing to say)
        return "CSV files are not images" + ("" if labels else f"; to match its labels to the images, pass "
                                                               f"--labels {path}")
    if path.name.startswith("."):
        return "a hidden file, not an image"
    kind = f"a {suffix} file" if suffix else "a file without an extension"
    return f"{kind} is not an image (.jpg, .jpeg, .png, .bmp, .tif, .tiff) or a .zip of images"


def collect(sources: list[Path], labels: Path | None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files to upload from the given files, folders (searched recursively) and zips, in a stable order, and
    every file skipped with its reason; a path that does not exist is an input error."""
    chosen: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for source in sources:
        if not source.exists():
            raise SubmitError(f"{source} does not exist (give image files, zips or folders of them)", EXIT_INPUT)
        found = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for path in found:
            if path.resolve() in seen:
                continue  # named twice (a file inside a folder also given): uploaded once
            seen.add(path.resolve())
            reason = skip_reason(path, labels)
            if reason is None:
                chosen.append(path)
            elif reason:
                skipped.append((path, reason))
    return chosen, skipped


def batch_key(parts: list[list[Path]], labels: Path | None) -> str:
    """The batch's key: a hash of its files' names and contents in upload order, how they are split into parts,
    and the labels file. The same command on the same files gives the same key, so the server answers with the
    job it started (and the parts it has): a re-run resumes it instead of uploading everything again."""
    import hashlib

    from skinscan.model.bundle import sha256_file

    digest = hashlib.sha256(b"skinscan-batch-1\n")
    for i, part in enumerate(parts):
        for path in part:
            digest.update(f"{i}\t{path.name}\t{sha256_file(path)}\n".encode())
    if labels is not None:
        digest.update(f"labels\t{sha256_file(labels)}\n".encode())
    return digest.hexdigest()[:48]


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


def _problem(resp: requests.Response) -> str:
    """One sentence from an error answer: the server's message and at most three of its details."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or "error" not in body:
        return f"the server answered HTTP {resp.status_code} (not a SkinScan API answer; is --url right?)"
    message = str(body["error"]).rstrip(".")
    details = [d for d in body.get("details") or [] if isinstance(d, dict)]
    if details:
        shown = "; ".join(f"{d.get('filename') or d.get('image_id') or 'line ' + str(d.get('line'))}: "
                          f"{d.get('error')}" for d in details[:3])
        message += f" ({shown}" + (f"; and {len(details) - 3:,} more)" if len(details) > 3 else ")")
    return message


def _check(resp: requests.Response) -> dict[str, Any]:
    if resp.status_code >= 400:
        raise SubmitError(f"the server refused the request (HTTP {resp.status_code}): {_problem(resp)}")
    try:
        return resp.json()
    except ValueError:
        raise SubmitError(f"{resp.url} did not answer with JSON: is --url a SkinScan server?", EXIT_SERVER) from None


def _server_above(session: requests.Session, base: str) -> str | None:
    """The SkinScan server whose page --url names (http://host/jobs/abc -> http://host), if one answers there."""
    import requests

    scheme, rest = base.split("://", 1)
    segments = rest.split("/")
    for cut in range(len(segments) - 1, 0, -1):
        candidate = f"{scheme}://{'/'.join(segments[:cut])}"
        try:
            resp = session.get(f"{candidate}{API_PREFIX}/jobs", params={"per_page": 1}, timeout=15)
        except requests.RequestException:
            return None
        if resp.status_code in (200, 401) and "json" in resp.headers.get("Content-Type", ""):
            return candidate
    return None


def check_server(session: requests.Session, base: str) -> str:
    """One cheap authenticated call: a clear sentence when nothing listens, it is no SkinScan, or the key is wrong.
    Returns the server's base URL (a page's address, such as http://host/jobs, is taken back to its server)."""
    import requests

    try:
        resp = session.get(f"{base}{API_PREFIX}/jobs", params={"per_page": 1}, timeout=15)
    except requests.exceptions.SSLError as exc:
        raise SubmitError(f"TLS failed talking to {base}: {exc.__class__.__name__} (is it http:// rather than "
                          "https://?)", EXIT_SERVER) from None
    except (requests.ConnectionError, requests.Timeout):
        raise SubmitError(f"no SkinScan server at {base}: is `skinscan serve` running?", EXIT_SERVER) from None
    except requests.RequestException as exc:
        raise SubmitError(f"cannot reach {base}: {exc.__class__.__name__}", EXIT_SERVER) from None
    if resp.status_code == 401:
        raise SubmitError(f"the server at {base} refused the API key: set SKINSCAN_API_KEY to a key printed by "
                          "`skinscan clinics create` (a new one: `skinscan clinics create NAME --new-key`)",
                          EXIT_SERVER)
    if resp.status_code == 404:
        server = _server_above(session, base)
        if server is not None:
            _say(f"--url {base} is a page of the SkinScan server at {server}: using {server}")
            return check_server(session, server)
        raise SubmitError(f"{base} answered 404 for {API_PREFIX}/jobs: it is not a SkinScan server (check --url)",
                          EXIT_SERVER)
    body = _check(resp)
    if "jobs" not in body:
        raise SubmitError(f"{base} is not a SkinScan server (check --url)", EXIT_SERVER)
    return base


def _post_files(session: requests.Session, url: str, paths: list[Path], data: dict[str, str]) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        files = [("files", (p.name, stack.enter_context(p.open("rb")))) for p in paths]
        return _check(session.post(url, files=files, data=data, timeout=600))


def _check_labels(labels: Path) -> None:
    """Read the labels file here first: a malformed one is refused before anything is uploaded."""
    from skinscan.labels import LabelFileError, parse_ground_truth

    if not labels.is_file():
        raise SubmitError(f"labels file {labels} does not exist", EXIT_INPUT)
    try:
        parse_ground_truth(labels.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise SubmitError(f"labels file {labels}: not UTF-8 text (save it as a UTF-8 CSV file)", EXIT_INPUT) from None
    except LabelFileError as exc:
        raise SubmitError(f"labels file {labels}: {exc}", EXIT_INPUT) from None


def _count_flagged(path: Path) -> int | None:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "flagged" not in reader.fieldnames:
            return None
        return sum(1 for row in reader if (row.get("flagged") or "").strip().lower() in ("1", "true"))


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # noqa: T201 - progress notes for the user, apart from the results


def submit(
    sources: list[Path] | Path, url: str, api_key: str, out: Path | None, labels: Path | None = None,
    part_files: int = 200, part_bytes: int = 100 * 1024 * 1024, poll_seconds: float = 1.0, timeout: float = 24 * 3600,
    name: str | None = None, progress: bool = True, new_job: bool = False,
) -> Summary:
    """Upload the images of the given files, folders and zips as one job, wait for it, write the results CSV;
    return the summary. Every file not uploaded is named with its reason."""
    import time

    import requests
    from tqdm import tqdm

    sources = [sources] if isinstance(sources, Path) else sources
    paths, skipped = collect(sources, labels)
    if not api_key:
        raise SubmitError("no API key: set SKINSCAN_API_KEY to the key `skinscan clinics create` printed",
                          EXIT_INPUT)
    base, note = normalise_url(url)
    if note:
        _say(note)
    for path, reason in skipped:
        _say(f"not uploading {path}: {reason}")
    if not paths:
        where = ", ".join(str(s) for s in sources)
        raise SubmitError(f"no images (.jpg, .png, .bmp, .tif or .zip) in {where}", EXIT_INPUT)
    if labels is not None:
        _check_labels(labels)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {api_key}"
    base = check_server(session, base)
    summary = Summary(name=name)
    parts = _parts(paths, part_files, part_bytes)
    key = batch_key(parts, labels) if not new_job else None
    try:
        return _run_job(session, base, parts, out, labels, key, poll_seconds, timeout, summary, progress, tqdm,
                        time)
    except (requests.ConnectionError, requests.Timeout):
        _interrupted(summary, resumable=key is not None)
        raise SubmitError(f"lost the connection to the SkinScan server at {base}", EXIT_SERVER) from None
    except KeyboardInterrupt:
        if key is None:
            _abandon(session, base, summary)
        else:
            _interrupted(summary, resumable=True)
        raise
    except SubmitError:
        _abandon(session, base, summary)
        raise


def _interrupted(summary: Summary, resumable: bool) -> None:
    """Say how to go on with a job this run did not follow to its end."""
    if not summary.job_id:
        return
    if summary.uploading and resumable:
        _say(f"job {summary.job_id}: upload interrupted; run the same command again to resume it (the parts "
             f"received are kept), or cancel it on its page: {summary.job_url}")
    elif not summary.uploading and not summary.status:
        _say(f"job {summary.job_id} goes on without this command; run the same command again, or "
             f"`skinscan results {summary.job_id}`, for its results: {summary.job_url}")


def _abandon(session: requests.Session, base: str, summary: Summary) -> None:
    """Cancel a job whose upload this run could not finish (no job left 'uploading'), and say so."""
    import requests

    if not summary.uploading:
        _interrupted(summary, resumable=False)
        return
    try:
        resp = session.post(f"{base}{API_PREFIX}/jobs/{summary.job_id}/cancel", timeout=15)
        done = resp.status_code < 400
    except requests.RequestException:
        done = False
    _say(f"job {summary.job_id}: upload not finished; " + (
        "the job was cancelled" if done else f"cancel or delete it on its page: {summary.job_url}"))


def _resumable(session: requests.Session, api: str, key: str) -> dict[str, Any] | None:
    """The clinic's job of this batch key that can go on (not cancelled, not failed with nothing scored)."""
    body = _check(session.get(f"{api}/jobs", params={"batch_key": key, "per_page": 1}, timeout=30))
    for job in body.get("jobs", []):
        if job["status"] != "cancelled" and not (job["status"] == "failed" and job["counts"]["scored"] == 0):
            return job
    return None


def _run_job(session: requests.Session, base: str, parts: list[list[Path]], out: Path | None, labels: Path | None,
             key: str | None, poll_seconds: float, timeout: float, summary: Summary, progress: bool, tqdm: Any,
             time: Any) -> Summary:
    """Upload in parts (or resume the batch's job), start the job with the labels, follow it, save its results."""
    api = f"{base}{API_PREFIX}"
    job = _resumable(session, api, key) if key else None
    received = 0
    if job is not None:
        summary.job_id, summary.job_url = job["id"], f"{base}/jobs/{job['id']}"
        received = min(len(parts), int(job.get("parts") or 0)) if job["status"] == "uploading" else len(parts)
        _say(f"resuming job {job['id']} ({job['status']}; {received:,} of {len(parts):,} upload parts received): "
             "the same files as an earlier run")
    if job is None or job["status"] == "uploading":
        _upload(session, api, base, parts, received, key, summary, progress, tqdm)
        job = _start(session, api, labels, summary)
        if job is None:
            return summary
    return _follow(session, api, job, out, poll_seconds, timeout, summary, progress, tqdm, time)


def _upload(session: requests.Session, api: str, base: str, parts: list[list[Path]], received: int,
            key: str | None, summary: Summary, progress: bool, tqdm: Any) -> None:
    """Send the parts not yet received, each numbered (a part sent twice is stored once)."""
    total = sum(len(p) for p in parts)
    with tqdm(total=total, desc="uploading", unit="file", disable=not progress) as bar:
        bar.update(sum(len(p) for p in parts[:received]))
        if not summary.job_id:
            form = {"finalize": "false", **({"name": summary.name} if summary.name else {}),
                    **({"batch_key": key} if key else {})}
            first = _post_files(session, f"{api}/jobs", parts[0], form)
            summary.job_id, summary.uploading = first["id"], True
            summary.job_url = f"{base}/jobs/{summary.job_id}"
            if first.get("resumed"):  # a concurrent run of the same batch made it meanwhile
                received = int(first.get("parts") or 0)
                if first["status"] != "uploading":
                    return
            else:
                summary.refused += first.get("rejected", [])
                received = 1
                bar.update(len(parts[0]))
        summary.uploading = True
        for i, part in enumerate(parts[received:], start=received):
            body = _post_files(session, f"{api}/jobs/{summary.job_id}/images", part, {"part": str(i)})
            summary.refused += body.get("rejected", [])
            bar.update(len(part))


def _start(session: requests.Session, api: str, labels: Path | None, summary: Summary) -> dict[str, Any] | None:
    """Close the upload (with the labels): the job as it is now, or None when it did not start (said why)."""
    current = _check(session.get(f"{api}/jobs/{summary.job_id}", timeout=30))
    if current["status"] != "uploading":  # started by an earlier or concurrent run of the same batch
        summary.uploading = False
        return current
    with contextlib.ExitStack() as stack:
        files = {"labels": (labels.name, stack.enter_context(labels.open("rb")))} if labels else None
        resp = session.post(f"{api}/jobs/{summary.job_id}/start", files=files, timeout=120)
    summary.uploading = False  # started, or failed with its reason recorded by the server
    if resp.status_code >= 400:
        summary.status, summary.error = "failed", f"the job did not start: {_problem(resp)}"
        return None
    job = _check(resp)
    summary.labels = job.get("labels")
    return job


def _follow(session: requests.Session, api: str, job: dict[str, Any], out: Path | None, poll_seconds: float,
            timeout: float, summary: Summary, progress: bool, tqdm: Any, time: Any) -> Summary:
    """Follow the job to its end, then save its results and fill the summary."""
    deadline = time.monotonic() + timeout
    summary.job_id = job["id"]
    with tqdm(total=job["counts"]["total"], desc="scoring", unit="img", disable=not progress) as bar:
        while True:
            job = _check(session.get(f"{api}/jobs/{summary.job_id}", timeout=30))
            done = JobCounts.from_api(job["counts"], job["status"]).finished
            bar.update(max(0, done - bar.n))
            if job["status"] in ("done", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise SubmitError(f"job {summary.job_id} not finished after {timeout:.0f} s; see {summary.job_url}")
            time.sleep(poll_seconds)
    summary.status, summary.error = job["status"], job.get("error")
    figures = JobCounts.from_api(job["counts"], job["status"])  # the figures every view shows
    summary.accepted, summary.scored, summary.not_scored = figures.images, figures.scored, figures.not_scored
    summary.refused_count = figures.refused
    summary.name = summary.name or job.get("name")
    summary.results = download_results(session, api, summary.job_id, out)
    summary.flagged = _count_flagged(summary.results)
    return summary


def download_results(session: requests.Session, api: str, job_id: str, out: Path | None) -> Path:
    """Write a job's results CSV (risk order) to out (default skinscan-results-<job id>.csv here)."""
    out = out or Path(f"skinscan-results-{job_id}.csv")
    resp = session.get(f"{api}/jobs/{job_id}/results", params={"format": "csv"}, timeout=600, stream=True)
    if resp.status_code == 404:
        raise SubmitError(f"no job {job_id} for this API key's clinic", EXIT_INPUT)
    if resp.status_code >= 400:
        _check(resp)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with tmp.open("wb") as fh:
        for block in resp.iter_content(1 << 16):
            fh.write(block)
    tmp.replace(out)  # a results file is whole or absent
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `skinscan submit` options and handler to a parser."""
    parser.epilog = ("Exit codes: 0 the job was scored; 1 the job failed or the server refused it; 2 bad input "
                     "(folder, labels file, options); 3 no server at --url, or the API key was refused.")
    parser.add_argument("sources", nargs="+", type=Path, metavar="PATH",
                        help="image files, zips of images, or folders of them (searched recursively); every other "
                             "file is named with the reason it is not uploaded")
    parser.add_argument("--url", default=os.environ.get("SKINSCAN_URL", DEFAULT_URL),
                        help="the server's address, e.g. http://127.0.0.1:8000 (default: $SKINSCAN_URL or "
                             f"{DEFAULT_URL}); http:// is added when missing and a trailing /api/v1 is accepted")
    parser.add_argument("--api-key", default=None,
                        help="the clinic's API key; better set SKINSCAN_API_KEY, which keeps it out of the shell "
                             "history (this option wins when both are given)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results CSV to write (default: skinscan-results-<job id>.csv here)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="ground-truth CSV (HAM10000 metadata, ISIC 2017, ISIC 2018/2019); it may cover more "
                             "images than the folder: rows are matched to the images by file name")
    parser.add_argument("--name", default=None, help="a batch name or reference shown in the jobs list")
    parser.add_argument("--part-files", type=int, default=200,
                        help="files per upload request (default: %(default)s)")
    parser.add_argument("--new-job", action="store_true",
                        help="make a new job even when an earlier run of the same files made one (by default the "
                             "same command resumes that job: the parts it received are not sent again)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars (for logs)")
    parser.set_defaults(func=_run)


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("SKINSCAN_URL", DEFAULT_URL),
                        help=f"the server's address (default: $SKINSCAN_URL or {DEFAULT_URL})")
    parser.add_argument("--api-key", default=None,
                        help="the clinic's API key; better set SKINSCAN_API_KEY (kept out of the shell history)")


def add_results_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `skinscan results` options and handler to a parser."""
    parser.add_argument("job", help="the job's id (shown by submit, in the jobs list and in the job page's address)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results CSV to write (default: skinscan-results-<job id>.csv here)")
    _server_options(parser)
    parser.set_defaults(func=_run_results)


def fetch_results(job_id: str, url: str, api_key: str, out: Path | None) -> tuple[dict[str, Any], Path]:
    """Write any job's results CSV (what is scored so far, if it is still running); return the job and the file."""
    import requests

    if not api_key:
        raise SubmitError("no API key: set SKINSCAN_API_KEY to the key `skinscan clinics create` printed",
                          EXIT_INPUT)
    base, note = normalise_url(url)
    if note:
        _say(note)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {api_key}"
    base = check_server(session, base)
    api = f"{base}{API_PREFIX}"
    try:
        resp = session.get(f"{api}/jobs/{job_id}", timeout=30)
        if resp.status_code == 404:
            raise SubmitError(f"no job {job_id} for this API key's clinic (the jobs list shows their ids)",
                              EXIT_INPUT)
        job = _check(resp)
        return job, download_results(session, api, job_id, out)
    except (requests.ConnectionError, requests.Timeout):
        raise SubmitError(f"lost the connection to the SkinScan server at {base}", EXIT_SERVER) from None


def _run_results(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get("SKINSCAN_API_KEY", "")
    try:
        job, path = fetch_results(args.job, args.url, api_key, args.out)
    except SubmitError as exc:
        _say(f"skinscan results: {exc}")
        return exc.code
    figures = JobCounts.from_api(job["counts"], job["status"])
    note = "" if job["status"] in ("done", "failed", "cancelled") else " (not finished: the results so far)"
    print(f"Job {job['id']}" + (f" ({job['name']})" if job.get("name") else "") + f": {job['status']}{note}\n"  # noqa: T201
          f"  images: {figures.images:,}   scored: {figures.scored:,}   not scored: {figures.not_scored:,}   "
          f"refused at upload: {figures.refused:,}\n  results: {path}")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get("SKINSCAN_API_KEY", "")
    try:
        summary = submit(args.sources, args.url, api_key, args.out, args.labels,
                         part_files=max(1, args.part_files), name=args.name, progress=args.progress,
                         new_job=args.new_job)
    except SubmitError as exc:
        _say(f"skinscan submit: {exc}")
        return exc.code
    except KeyboardInterrupt:
        _say("skinscan submit: interrupted")
        return 130
    print("\n".join(summary.lines()))  # noqa: T201 - the command's report
    return EXIT_OK if summary.status == "done" else EXIT_FAILED
