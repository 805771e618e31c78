"""Turning an upload (files, zips, a labels CSV) into stored images and a committed job."""

from __future__ import annotations

import hashlib
import logging
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from skinscan import audit
from skinscan.imaging import ACCEPTED_FORMATS, ImageError, strip_metadata
from skinscan.labels import GroundTruth, LabelFileError, LabelMatch, image_id_of, match_labels, parse_ground_truth
from skinscan.model.registry import ensure_production_model
from skinscan.orphans import UploadIntent, begin_upload, discard_upload, end_upload
from skinscan.settings import Settings
from skinscan.storage import Storage
from skinscan.tables import Clinic, ImageRecord, Job, new_id, utcnow

log = logging.getLogger(__name__)

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tif"}
UPLOAD_INTENTS = "skinscan.upload_intents"  # session.info key: the intents of this request's uploads
JOB_NAME_MAX = 200


class UploadError(ValueError):
    """An upload refused as a whole, with the HTTP status to answer (400, 413, 415)."""

    def __init__(self, message: str, status: int = 400, details: list[dict[str, object]] | None = None) -> None:
        self.status = status
        self.details = details or []
        super().__init__(message)


@dataclass
class Rejected:
    """A file refused on its own; the rest of the batch goes on."""

    filename: str
    status: int
    error: str


@dataclass
class IntakeResult:
    """What an upload produced: the job, how many images were accepted, which files were refused."""

    job: Job
    accepted: int
    rejected: list[Rejected] = field(default_factory=list)
    labels: LabelMatch | None = None


def clean_filename(name: str) -> str:
    """Return a display-safe file name: base name only, normalised unicode, no control chars, <= 255 chars."""
    name = unicodedata.normalize("NFC", name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip() or "unnamed"
    if len(name) > 255:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: 250 - len(ext)] + "~." + ext) if dot and len(ext) <= 10 else name[:255]
    return name


def clean_job_name(name: str | None) -> str | None:
    """Return a batch name fit to store and show (printable, single spaces, <= 200 chars), or None when blank."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in unicodedata.normalize("NFC", name or "")).split())
    return text[:JOB_NAME_MAX] or None


def iter_zip(
    stream: IO[bytes], settings: Settings, zip_name: str = "upload.zip",
) -> Iterator[tuple[str, bytes | Rejected]]:
    """Yield (name, bytes) for each file in a zip, refusing members too large or too compressed.

    A zip that cannot be read or that would expand past the upload limit is refused on its own (the rest of
    the upload goes on).
    """
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        yield zip_name, Rejected(zip_name, 400, "the zip file is corrupt or not a zip")
        return
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        declared = sum(m.file_size for m in members)
        if declared > settings.max_upload_bytes:
            yield zip_name, Rejected(zip_name, 413, f"the zip expands to {declared:,} bytes, over the limit of "
                                                    f"{settings.max_upload_bytes:,} (possible zip bomb)")
            return
        for member in members:
            name = clean_filename(member.filename)
            base = member.filename.replace("\\", "/").rsplit("/", 1)[-1]
            if base.startswith(".") or member.filename.startswith("__MACOSX/"):
                continue
            if member.file_size > settings.max_file_bytes:
                yield name, Rejected(name, 413, f"file is {member.file_size:,} bytes, over the limit of "
                                                f"{settings.max_file_bytes:,}")
                continue
            if member.compress_size and member.file_size / member.compress_size > settings.max_zip_ratio:
                yield name, Rejected(name, 413, "compression ratio too high (possible zip bomb)")
                continue
            try:
                with archive.open(member) as fh:
                    data = fh.read(settings.max_file_bytes + 1)
            except (zipfile.BadZipFile, RuntimeError, OSError, NotImplementedError) as exc:
                yield name, Rejected(name, 400, f"cannot read from zip: {exc}")
                continue
            if len(data) > settings.max_file_bytes:
                yield name, Rejected(name, 413, "file larger than it claims (possible zip bomb)")
                continue
            yield name, data


def iter_files(files: list[tuple[str, IO[bytes]]], settings: Settings) -> Iterator[tuple[str, bytes | Rejected]]:
    """Yield (name, bytes or Rejected) for uploaded files, expanding zips."""
    for raw_name, stream in files:
        name = clean_filename(raw_name)
        head = stream.read(4)
        stream.seek(0)
        if head.startswith(b"PK\x03\x04") or name.lower().endswith(".zip"):
            yield from iter_zip(stream, settings, name)
            continue
        data = stream.read(settings.max_file_bytes + 1)
        if len(data) > settings.max_file_bytes:
            yield name, Rejected(name, 413, f"file over the limit of {settings.max_file_bytes:,} bytes")
            continue
        yield name, data


def parse_labels(data: bytes | None) -> GroundTruth | None:
    """Parse an uploaded labels CSV, raising UploadError(400) that names the line and the problem."""
    if not data:
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UploadError("labels file: not UTF-8 text (save it as a UTF-8 CSV file)", 400) from None
    try:
        return parse_ground_truth(text)
    except LabelFileError as exc:  # one sentence naming the line
        raise UploadError(f"labels file: {exc}", 400,
                          [{"line": exc.line, "error": exc.reason}] if exc.line else None) from None


def store_image(storage: Storage, prefix: str, data: bytes) -> tuple[str, str, str, int]:
    """Strip identifying metadata, store under an opaque key below the upload's prefix; return (key, sha256 of the
    upload, type, size)."""
    digest = hashlib.sha256(data).hexdigest()
    clean, fmt = strip_metadata(data)
    key = f"{prefix}{new_id()}.{EXTENSIONS[fmt]}"
    storage.put(key, clean, ACCEPTED_FORMATS[fmt])
    return key, digest, ACCEPTED_FORMATS[fmt], len(data)


def add_images(
    session: Session, storage: Storage, job: Job, items: Iterator[tuple[str, bytes | Rejected]],
    settings: Settings, intent: UploadIntent | None = None,
) -> tuple[int, list[Rejected]]:
    """Store each accepted image and add its row to the session; refused files become failed rows.

    The intent to store (committed first, begun here unless given) ends in the session's transaction: committing
    the rows claims the objects, and anything else leaves them to discard_stored or the orphan sweeper. The job's
    row is locked before the rows are inserted and the part refused (UploadError 409) unless the job is still
    uploading; the rows are numbered after the job's images under that lock.
    """
    intent = intent or begin_upload(settings, job.clinic_id, job.id)
    known = session.info.setdefault(UPLOAD_INTENTS, [])
    if intent not in known:
        known.append(intent)
    accepted, rejected, rows = 0, [], []

    def row(name: str, status: str, size: int, error: str | None = None, key: str | None = None,
            digest: str | None = None, ctype: str | None = None) -> None:
        rows.append({"id": new_id(), "job_id": job.id, "clinic_id": job.clinic_id, "position": len(rows),
                     "filename": name, "storage_key": key, "sha256": digest, "size": size, "content_type": ctype,
                     "status": status, "error": error, "attempts": 0, "created_at": utcnow()})

    for name, item in items:
        if len(rows) >= settings.max_files:
            raise UploadError(f"more than {settings.max_files:,} files in one upload", 413)
        if isinstance(item, Rejected):
            rejected.append(item)
            row(name, "failed", 0, item.error)
            continue
        try:  # strip_metadata checks the type and size first (sniff_format), refusing with ImageError
            key, digest, ctype, size = store_image(storage, intent.prefix, item)
        except ImageError as exc:
            rejected.append(Rejected(name, 415 if exc.unsupported else 400, str(exc)))
            row(name, "failed", len(item), str(exc))
            continue
        row(name, "pending", size, key=key, digest=digest, ctype=ctype)
        accepted += 1
    job = lock_open_job(session, job.id)  # after storing, so the lock is held only while the rows commit
    base = session.scalar(select(func.count()).where(ImageRecord.job_id == job.id)) or 0
    for n, r in enumerate(rows):  # numbered under the lock: concurrent parts never share a position
        r["position"] = base + n
    if rows:  # one multi-row INSERT for the part (no ORM object per image to flush)
        session.execute(insert(ImageRecord), rows)
    job.refused = (job.refused or 0) + len(rejected)
    job.updated_at = utcnow()  # an upload in parts is alive; the stale-upload sweeper goes by this
    end_upload(session, intent)
    return accepted, rejected


def lock_open_job(session: Session, job_id: str) -> Job:
    """Lock the job's row for this transaction and return it fresh; UploadError(409) unless it is uploading.

    Every view that adds to, starts or cancels a job takes this lock before it checks the status, so a part
    never lands in a job a concurrent start or cancel has just closed (the worker's claim takes it too).
    """
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None:
        raise UploadError("the job was deleted while this part was uploading; nothing was kept", 409)
    if job.status != "uploading":
        raise UploadError(f"job is {job.status}; images can only be added while it is uploading (this part was "
                          "not kept)", 409)
    return job


def apply_labels(session: Session, job: Job, truth: GroundTruth) -> LabelMatch:
    """Attach true labels to the job's images by image id; rows for other images are counted, never refused.

    Images without a row stay unlabelled. The job is marked labelled only when at least one image matched.
    """
    images = session.query(ImageRecord).filter(ImageRecord.job_id == job.id,
                                               ImageRecord.storage_key.is_not(None)).all()  # not refused files
    by_id: dict[str, list[ImageRecord]] = {}
    for img in images:
        by_id.setdefault(image_id_of(img.filename), []).append(img)
    match = match_labels(truth, set(by_id))
    for image_id, label in match.labels.items():
        for img in by_id[image_id]:
            img.true_label = label
    if match.labels:
        job.labels_format, job.known_labels = truth.format, list(truth.known_labels)
    if match.unmatched_rows:
        log.info("job %s: %s", job.id, match.summary())
    return match


def fail_job(session: Session, job: Job, reason: str) -> None:
    """Record that a job could not start: status failed with the reason, its pending images failed too.

    The images stay stored until the job is deleted; nothing is left looking as if it were still uploading.
    """
    session.query(ImageRecord).filter(ImageRecord.job_id == job.id, ImageRecord.status == "pending").update(
        {"status": "failed", "error": "the job did not start"}, synchronize_session=False)
    session.flush()
    statuses = [s for (s,) in session.query(ImageRecord.status).filter(ImageRecord.job_id == job.id).all()]
    job.total, job.scored, job.failed = len(statuses), statuses.count("scored"), statuses.count("failed")
    job.status, job.error = "failed", reason[:2000]
    job.finished_at = job.updated_at = utcnow()


def create_job(
    session: Session, storage: Storage, clinic: Clinic, files: list[tuple[str, IO[bytes]]],
    labels: bytes | None, settings: Settings, actor: str, finalize: bool = True, name: str | None = None,
    batch_key: str | None = None,
) -> IntakeResult:
    """Store the upload's images and commit the job with all its rows in one transaction (not enqueued)."""
    truth = parse_labels(labels)
    job_id = new_id()
    intent = begin_upload(settings, clinic.id, job_id)  # committed before this session writes (SQLite: one writer)
    session.info.setdefault(UPLOAD_INTENTS, []).append(intent)  # discarded with the request if anything fails
    model = ensure_production_model(session, settings)
    job = Job(id=job_id, clinic_id=clinic.id, status="uploading", model_version=model.version,
              name=clean_job_name(name), batch_key=batch_key, parts=1)  # this request is part 0
    session.add(job)
    session.flush()
    accepted, rejected = add_images(session, storage, job, iter_files(files, settings), settings, intent=intent)
    if accepted == 0:
        statuses = {r.status for r in rejected}
        status = 415 if statuses == {415} else 413 if statuses == {413} else 400
        message = "no image could be accepted" if rejected else "no files in the upload (field 'files')"
        raise UploadError(message, status, [r.__dict__ for r in rejected])
    session.flush()
    match = apply_labels(session, job, truth) if truth is not None else None
    audit.record(session, "job.create", actor, clinic.id, "job", job.id,
                 {"accepted": accepted, "rejected": len(rejected), "labels": truth.format if truth else None,
                  **(label_details(match) if match else {})})
    if finalize:
        finalize_job(session, job)
    return IntakeResult(job, accepted, rejected, match)


def upload_refusals(session: Session, job: Job, limit: int = 200) -> tuple[int, list[tuple[str, str]]]:
    """Return how many files of a job were refused at upload (never stored) and the first `limit` (name, reason).

    A refused file keeps a row (so exports list it) but is not one of the job's images: the pages count it apart.
    """
    where = (ImageRecord.job_id == job.id, ImageRecord.status == "failed", ImageRecord.storage_key.is_(None))
    count = session.query(ImageRecord).filter(*where).count()
    rows = (session.query(ImageRecord.filename, ImageRecord.error).filter(*where)
            .order_by(ImageRecord.position).limit(limit).all()) if count else []
    return count, [(name, error or "refused") for name, error in rows]


def label_details(match: LabelMatch) -> dict[str, object]:
    """The label match as JSON for a response or an audit entry."""
    return {"labelled": len(match.labels), "unlabelled": match.unlabelled,
            "unmatched_label_rows": match.unmatched_rows, "labels_summary": match.summary()}


def finalize_job(session: Session, job: Job) -> None:
    """Close a job for uploads: set its counters and status to queued (the caller commits, then enqueues)."""
    session.flush()
    images = [s for (s,) in session.query(ImageRecord.status).filter(ImageRecord.job_id == job.id).all()]
    # parts are scored while later ones upload: some images may be finished already
    job.total, job.scored, job.failed = len(images), images.count("scored"), images.count("failed")
    job.status = "queued"
    job.updated_at = utcnow()


def discard_stored(session: Session, storage: Storage) -> None:
    """Roll back a refused upload and remove every object it stored now (the orphan sweeper, if storage fails)."""
    intents = session.info.pop(UPLOAD_INTENTS, [])
    session.rollback()
    discard_upload(session, storage, intents)


def enqueue_committed(session: Session, job: Job, settings: Settings, closed: bool = True) -> None:
    """Send a committed part's (or job's) chunks to the workers; once the job is `closed` for uploads, have it
    finished if nothing is left pending. A broker outage is logged (the stalled-job sweeper resends)."""
    from skinscan.jobs.dispatch import enqueue_job, finish_if_complete

    try:
        enqueue_job(session, job.id, settings)
        if closed:
            finish_if_complete(session, job.id, settings)
    except Exception:  # noqa: BLE001 - the job is committed; it is requeued later
        log.exception("job %s committed but not enqueued; it will be requeued", job.id)
