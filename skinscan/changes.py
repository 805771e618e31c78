"""The change report of a re-score: images whose predicted class or referral flag the new model judges differently.

For each image of a run, the new prediction is the run's model's (`model_to`, written after the run began) and the
previous one is the image's latest prediction from before the run began, whichever model made it. The report's
lines are written (RescoreChange) when the chunk holding the image completes, so a page of the report is one
index range read, newly flagged images first, then by new malignancy (highest first), then by image id.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select, tuple_
from sqlalchemy.orm import Session

from skinscan.csvsafe import iter_csv_text
from skinscan.tables import ImageRecord, Prediction, RescoreChange, RescoreRun

CSV_COLUMNS = ["image_id", "job_id", "filename", "change", "previous_model", "previous_label",
               "previous_malignancy", "previous_flagged", "new_model", "new_label", "new_malignancy", "new_flagged",
               "true_label"]

NEWLY_FLAGGED = "newly_flagged"
UNFLAGGED = "no_longer_flagged"
LABEL_CHANGED = "label_changed"
PAGE_DEFAULT, PAGE_MAX = 100, 1000


class CursorError(ValueError):
    """A change report cursor that this server did not hand out (or that was altered)."""


@dataclass(frozen=True)
class Position:
    """Keyset position in a change report: (rank, order_key, image_id) of the last line read."""

    rank: int
    order_key: float
    image_id: str

    def encode(self) -> str:
        """Return the position as an opaque URL-safe cursor."""
        raw = json.dumps([self.rank, self.order_key, self.image_id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, cursor: str) -> Position:
        """Parse a cursor from encode(); raise CursorError for anything else."""
        try:
            if len(cursor) > 200:
                raise ValueError("too long")
            rank, key, image_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
            if (type(rank) is not int or rank not in (0, 1) or type(key) not in (int, float)
                    or not math.isfinite(key) or not isinstance(image_id, str) or not 0 < len(image_id) <= 32):
                raise ValueError("not a position")
        except (binascii.Error, ValueError, TypeError, OverflowError, RecursionError):
            raise CursorError("cursor is not one this report handed out") from None
        return cls(rank, float(key), image_id)


def classify(old_label: str, old_flagged: bool, new_label: str, new_flagged: bool) -> str | None:
    """Return how a prediction changed (newly flagged, no longer flagged, label changed) or None if it did not."""
    if new_flagged and not old_flagged:
        return NEWLY_FLAGGED
    if old_flagged and not new_flagged:
        return UNFLAGGED
    if old_label != new_label:
        return LABEL_CHANGED
    return None


def change_line(run_id: int, clinic_id: str, old: Prediction, new: Prediction) -> dict[str, Any] | None:
    """Return the RescoreChange row of an image whose prediction changed from old to new, or None."""
    change = classify(old.label, bool(old.flagged), new.label, bool(new.flagged))
    if change is None:
        return None
    return {"run_id": run_id, "image_id": new.image_id, "clinic_id": clinic_id, "change": change,
            "rank": 0 if change == NEWLY_FLAGGED else 1, "order_key": -float(new.malignancy),
            "previous_model": old.model_version, "previous_label": old.label,
            "previous_malignancy": float(old.malignancy), "previous_flagged": bool(old.flagged),
            "new_model": new.model_version, "new_label": new.label, "new_malignancy": float(new.malignancy),
            "new_flagged": bool(new.flagged)}


def latest_run(session: Session, clinic_id: str, finished_only: bool = True) -> RescoreRun | None:
    """Return the newest run that covered this clinic's images (finished ones only, unless asked)."""
    query = select(RescoreRun).where(or_(RescoreRun.clinic_id.is_(None), RescoreRun.clinic_id == clinic_id))
    if finished_only:
        query = query.where(RescoreRun.status == "done")
    return session.scalars(query.order_by(RescoreRun.started_at.desc(), RescoreRun.id.desc()).limit(1)).first()


def _after(position: Position) -> Any:
    c = RescoreChange  # every key ascending (order_key is minus the malignancy): a row comparison, one index seek
    return tuple_(c.rank, c.order_key, c.image_id) > tuple_(position.rank, position.order_key, position.image_id)


def change_page(session: Session, run: RescoreRun, clinic_id: str | None = None, after: Position | None = None,
                limit: int = PAGE_DEFAULT) -> tuple[list[dict[str, Any]], Position | None]:
    """Return one page of a run's changed images (of one clinic, or all) and the position to read on from.

    One query per page; the position is None after the last page.
    """
    c = RescoreChange
    query = (select(c, ImageRecord.job_id, ImageRecord.filename, ImageRecord.true_label)
             .join(ImageRecord, ImageRecord.id == c.image_id).where(c.run_id == run.id))
    if clinic_id is not None:
        query = query.where(c.clinic_id == clinic_id)
    if after is not None:
        query = query.where(_after(after))
    found = session.execute(query.order_by(c.rank, c.order_key, c.image_id).limit(limit + 1)).all()
    rows = [{
        "image_id": ch.image_id, "job_id": job_id, "filename": filename, "change": ch.change,
        "previous_model": ch.previous_model, "previous_label": ch.previous_label,
        "previous_malignancy": ch.previous_malignancy, "previous_flagged": bool(ch.previous_flagged),
        "new_model": ch.new_model, "new_label": ch.new_label, "new_malignancy": ch.new_malignancy,
        "new_flagged": bool(ch.new_flagged), "true_label": true_label,
    } for ch, job_id, filename, true_label in found[:limit]]
    last = found[limit - 1][0] if len(found) > limit else None
    return rows, Position(last.rank, last.order_key, last.image_id) if last is not None else None


def iter_change_rows(session: Session, run: RescoreRun, clinic_id: str | None = None,
                     page: int = PAGE_MAX) -> Iterator[dict[str, Any]]:
    """Yield every changed image of a run (of one clinic, or all) in report order, reading a page at a time."""
    position: Position | None = None
    while True:
        rows, position = change_page(session, run, clinic_id, position, page)
        yield from rows
        if position is None:
            return


def change_rows(session: Session, run: RescoreRun, clinic_id: str | None = None) -> list[dict[str, Any]]:
    """Return all of a run's changed images (of one clinic, or all), newly flagged first, then by new malignancy."""
    return list(iter_change_rows(session, run, clinic_id))


def _change_cells(r: dict[str, Any]) -> list[Any]:
    return [r["image_id"], r["job_id"], r["filename"], r["change"], r["previous_model"], r["previous_label"],
            f"{r['previous_malignancy']:.6f}", int(r["previous_flagged"]), r["new_model"], r["new_label"],
            f"{r['new_malignancy']:.6f}", int(r["new_flagged"]), r["true_label"] or ""]


def iter_changes_csv(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """Yield the change report as CSV text (header first), a line at a time; text cells are formula-safe."""
    return iter_csv_text(CSV_COLUMNS, ([_change_cells(r)] for r in rows))
