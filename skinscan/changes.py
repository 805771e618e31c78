"""The change report of a re-score: images whose predicted class or referral flag the new model judges differently.

For each image of a run, the new prediction is the run's model's (`model_to`, written after the run began) and the
previous one is the image's latest prediction from before the run began, whichever model made it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session, aliased

from skinscan.csvsafe import csv_row
from skinscan.tables import ImageRecord, Prediction, RescoreRun

CSV_COLUMNS = ["image_id", "job_id", "filename", "change", "previous_model", "previous_label",
               "previous_malignancy", "previous_flagged", "new_model", "new_label", "new_malignancy", "new_flagged",
               "true_label"]

NEWLY_FLAGGED = "newly_flagged"
UNFLAGGED = "no_longer_flagged"
LABEL_CHANGED = "label_changed"


def latest_run(session: Session, clinic_id: str, finished_only: bool = True) -> RescoreRun | None:
    """Return the newest run that covered this clinic's images (finished ones only, unless asked)."""
    query = select(RescoreRun).where(or_(RescoreRun.clinic_id.is_(None), RescoreRun.clinic_id == clinic_id))
    if finished_only:
        query = query.where(RescoreRun.status == "done")
    return session.scalars(query.order_by(RescoreRun.started_at.desc(), RescoreRun.id.desc()).limit(1)).first()


def _change_query(run: RescoreRun, clinic_id: str | None) -> Any:
    ranked = (
        select(Prediction.id, Prediction.image_id,
               func.row_number().over(partition_by=Prediction.image_id,
                                      order_by=(Prediction.created_at.desc(), Prediction.id.desc())).label("rn"))
        .join(ImageRecord, ImageRecord.id == Prediction.image_id)
        .where(Prediction.created_at <= run.started_at)
    )
    new, old = aliased(Prediction, name="new"), aliased(Prediction, name="old")
    ranked = _scope(ranked, run, clinic_id).subquery("ranked")
    newly = and_(new.flagged.is_(True), old.flagged.is_(False))
    query = (
        select(ImageRecord.id, ImageRecord.job_id, ImageRecord.filename, ImageRecord.true_label,
               old.model_version, old.label, old.malignancy, old.flagged,
               new.model_version, new.label, new.malignancy, new.flagged)
        .join(new, and_(new.image_id == ImageRecord.id, new.model_version == run.model_to,
                        new.created_at > run.started_at))
        .join(ranked, and_(ranked.c.image_id == ImageRecord.id, ranked.c.rn == 1))
        .join(old, old.id == ranked.c.id)
        .where(or_(old.label != new.label, old.flagged != new.flagged))
        .order_by(case((newly, 0), else_=1), new.malignancy.desc(), ImageRecord.created_at, ImageRecord.id)
    )
    return _scope(query, run, clinic_id)


def _scope(query: Any, run: RescoreRun, clinic_id: str | None) -> Any:
    if run.clinic_id is not None:
        query = query.where(ImageRecord.clinic_id == run.clinic_id)
    if clinic_id is not None:
        query = query.where(ImageRecord.clinic_id == clinic_id)
    if run.since is not None:
        query = query.where(ImageRecord.created_at >= run.since)
    return query


def change_rows(session: Session, run: RescoreRun, clinic_id: str | None = None) -> list[dict[str, Any]]:
    """Return a run's changed images (of one clinic, or all), newly flagged first, then by new malignancy."""
    rows = []
    for (image_id, job_id, filename, true_label, old_model, old_label, old_mal, old_flag,
         new_model, new_label, new_mal, new_flag) in session.execute(_change_query(run, clinic_id)):
        change = NEWLY_FLAGGED if new_flag and not old_flag else UNFLAGGED if old_flag and not new_flag \
            else LABEL_CHANGED
        rows.append({
            "image_id": image_id, "job_id": job_id, "filename": filename, "change": change,
            "previous_model": old_model, "previous_label": old_label, "previous_malignancy": old_mal,
            "previous_flagged": bool(old_flag), "new_model": new_model, "new_label": new_label,
            "new_malignancy": new_mal, "new_flagged": bool(new_flag), "true_label": true_label,
        })
    return rows


def change_counts(session: Session, run: RescoreRun, clinic_id: str | None = None) -> tuple[int, int]:
    """Return (changed images, newly flagged images) of a run, for one clinic or all."""
    rows = change_rows(session, run, clinic_id)
    return len(rows), sum(1 for r in rows if r["change"] == NEWLY_FLAGGED)


def iter_changes_csv(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """Yield the change report as CSV text (header first), a line at a time; text cells are formula-safe."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow(csv_row([
            r["image_id"], r["job_id"], r["filename"], r["change"], r["previous_model"], r["previous_label"],
            f"{r['previous_malignancy']:.6f}", int(r["previous_flagged"]), r["new_model"], r["new_label"],
            f"{r['new_malignancy']:.6f}", int(r["new_flagged"]), r["true_label"] or "",
        ]))
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
    rest = buf.getvalue()
    if rest:
        yield rest
