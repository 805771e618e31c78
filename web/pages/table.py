"""The job page's results table: images joined with predictions, sorted, filtered and paginated in SQL."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Select, and_, exists, func, not_, select
from sqlalchemy.orm import Session

from skinscan.labels import CLASSES
from skinscan.model.registry import production_model
from skinscan.reviews import current_reviews
from skinscan.tables import ImageRecord, Job, Prediction, Review
from web.risk_order import NOT_SHOWN_STATUSES, ranked_ids, shown_join
from web.risk_order import results_version as results_version  # re-exported for the pages

SORTS: dict[str, Any] = {
    "malignancy": Prediction.malignancy,
    "probability": Prediction.confidence,
    "class": Prediction.label,
    "flag": Prediction.flagged,
    "file": func.lower(ImageRecord.filename),
    "upload": ImageRecord.position,
}
FIRST_DIRECTION = {"malignancy": "desc", "probability": "desc", "flag": "desc", "class": "asc", "file": "asc",
                   "upload": "asc"}
PER_PAGE = (10, 25, 50, 100, 200)
FLAG_FILTERS = ("", "yes", "no")
REVIEW_FILTERS = ("", "no", "yes")  # all, not reviewed yet, reviewed


@dataclass(frozen=True)
class TableQuery:
    """What the table shows: sort column and direction, class and referral filters, page."""

    sort: str = "malignancy"
    direction: str = "desc"
    cls: str = ""
    flag: str = ""
    page: int = 1
    per_page: int = 50
    reviewed: str = ""

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> TableQuery:
        """Read a query from request arguments, falling back to the defaults for anything not allowed."""
        sort = args.get("sort", "malignancy")
        sort = sort if sort in SORTS else "malignancy"
        direction = args.get("dir", FIRST_DIRECTION[sort])
        direction = direction if direction in ("asc", "desc") else FIRST_DIRECTION[sort]
        label = args.get("class", "")
        flag = args.get("flag", "")
        reviewed = args.get("reviewed", "")
        try:
            page = max(1, int(args.get("page", 1)))
        except ValueError:
            page = 1
        try:
            per_page = int(args.get("per_page", 50))
        except ValueError:
            per_page = 50
        return cls(sort=sort, direction=direction, cls=label if label in CLASSES else "",
                   flag=flag if flag in FLAG_FILTERS else "", page=page,
                   per_page=per_page if per_page in PER_PAGE else 50,
                   reviewed=reviewed if reviewed in REVIEW_FILTERS else "")

    def args(self, **changes: Any) -> dict[str, Any]:
        """Return URL arguments for this query with some fields changed (defaults left out)."""
        q = replace(self, **changes)
        out = {"sort": q.sort, "dir": q.direction, "class": q.cls, "flag": q.flag, "page": q.page,
               "per_page": q.per_page, "reviewed": q.reviewed}
        defaults = {"sort": "malignancy", "dir": "desc", "class": "", "flag": "", "page": 1, "per_page": 50,
                    "reviewed": ""}
        return {k: v for k, v in out.items() if v != defaults[k]}

    def sorted_by(self, column: str) -> dict[str, Any]:
        """URL arguments to sort by a column: its natural direction first, the other one when clicked again."""
        if column == self.sort:
            direction = "asc" if self.direction == "desc" else "desc"
        else:
            direction = FIRST_DIRECTION[column]
        return self.args(sort=column, direction=direction, page=1)

    def aria_sort(self, column: str) -> str:
        """The aria-sort value of a column header."""
        if column != self.sort:
            return "none"
        return "ascending" if self.direction == "asc" else "descending"


@dataclass
class ResultRow:
    """One table row: the uploaded file, its prediction under the shown model version (None if unscored) and its
    risk rank in the whole job (1 = highest malignancy score), whatever the table's sort and filters."""

    image: ImageRecord
    prediction: Prediction | None
    rank: int = 0
    review: Review | None = None  # the current (latest) review, if any


@dataclass
class TablePage:
    """One page of rows and where it sits among all matching rows."""

    rows: list[ResultRow]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        """Number of pages (at least 1)."""
        return max(1, math.ceil(self.total / self.per_page))

    @property
    def first(self) -> int:
        """1-based number of the first row on this page (0 when empty)."""
        return 0 if not self.rows else (self.page - 1) * self.per_page + 1

    @property
    def last(self) -> int:
        """1-based number of the last row on this page."""
        return self.first + len(self.rows) - 1 if self.rows else 0


def _filtered(stmt: Select[Any], job: Job, q: TableQuery) -> Select[Any]:
    # the job's images: files refused at upload (nothing stored) are listed in their own section, not as images
    stmt = stmt.where(ImageRecord.job_id == job.id, ImageRecord.storage_key.is_not(None))
    if q.cls:
        stmt = stmt.where(Prediction.label == q.cls)
    if q.flag == "yes":
        stmt = stmt.where(Prediction.flagged.is_(True))
    elif q.flag == "no":
        stmt = stmt.where(Prediction.flagged.is_(False))
    reviewed = exists().where(Review.image_id == ImageRecord.id)
    if q.reviewed == "yes":
        stmt = stmt.where(reviewed)
    elif q.reviewed == "no":
        stmt = stmt.where(not_(reviewed))
    return stmt


def results_page(session: Session, job: Job, version: str | None, q: TableQuery) -> TablePage:
    """Return one page of the job's rows, filtered and sorted in the database (unscored rows last)."""
    join = shown_join(version)
    total = session.scalar(_filtered(select(func.count()).select_from(ImageRecord).outerjoin(Prediction, join), job, q))
    total = int(total or 0)
    page = min(q.page, max(1, math.ceil(total / q.per_page)))
    column = SORTS[q.sort]
    order = (column.asc() if q.direction == "asc" else column.desc()).nulls_last()
    ranked = ranked_ids(job, version)
    stmt = (_filtered(select(ImageRecord, Prediction, ranked.c.rank).outerjoin(Prediction, join)
                      .join(ranked, ranked.c.image_id == ImageRecord.id), job, q)
            .order_by(order, ImageRecord.position, ImageRecord.id).limit(q.per_page).offset((page - 1) * q.per_page))
    rows = [ResultRow(image, prediction, int(rank)) for image, prediction, rank in session.execute(stmt).all()]
    reviews = current_reviews(session, [row.image.id for row in rows])  # one query for the page's rows
    for row in rows:
        row.review = reviews.get(row.image.id)
    return TablePage(rows=rows, total=total, page=page, per_page=q.per_page)


def class_counts(session: Session, job: Job, version: str | None) -> dict[str, int]:
    """Return how many of the job's images each class was predicted for (every class, zeros included)."""
    return tile_counts(session, job, version)[0]


def flagged_count(session: Session, job: Job, version: str | None) -> int:
    """Return how many of the job's images are flagged for referral (a cancelled image's late prediction aside)."""
    return tile_counts(session, job, version)[1]


def refused_files(session: Session, job: Job, limit: int = 200) -> list[tuple[str, str]]:
    """Return (file name, reason) of the job's files that could not be scored, in upload order."""
    return [(name, error or "could not be scored") for name, error in session.execute(
        select(ImageRecord.filename, ImageRecord.error)
        .where(ImageRecord.job_id == job.id, ImageRecord.status == "failed")
        .order_by(ImageRecord.position).limit(limit)
    ).all()]


def prediction_for(session: Session, image: ImageRecord, version: str | None) -> Prediction | None:
    """Return an image's prediction under a model version."""
    if version is None:
        return None
    return session.scalars(select(Prediction).where(Prediction.image_id == image.id,
                                                    Prediction.model_version == version)).first()


def tile_counts(session: Session, job: Job, version: str | None) -> tuple[dict[str, int], int]:
    """Return (images per predicted class, flagged images) of a job in one grouped query (no per-image work)."""
    classes = dict.fromkeys(CLASSES, 0)
    flagged = 0
    for label, is_flagged, n in session.execute(
        select(Prediction.label, Prediction.flagged, func.count())
        .join(ImageRecord, ImageRecord.id == Prediction.image_id)
        .where(ImageRecord.job_id == job.id, Prediction.model_version == version,
               ImageRecord.status.not_in(NOT_SHOWN_STATUSES))
        .group_by(Prediction.label, Prediction.flagged)
    ).all():
        if label in classes:
            classes[label] += int(n)
        flagged += int(n) if is_flagged else 0
    return classes, flagged


def flag_counts_by_job(session: Session, jobs: list[Job]) -> dict[str, tuple[int, int]]:
    """Return each listed job's (flagged, flagged not yet reviewed) counts under the version its page shows, in
    one grouped query for the whole list."""
    if not jobs:
        return {}
    prod = production_model(session)
    versions = {j.model_version for j in jobs if j.model_version} | ({prod.version} if prod else set())
    flagged = Prediction.flagged.is_(True)
    reviewed = exists().where(Review.image_id == ImageRecord.id)
    counts: dict[tuple[str, str], tuple[int, int, int]] = {}
    for job_id, version, n, n_flagged, n_unreviewed in session.execute(
        select(ImageRecord.job_id, Prediction.model_version, func.count(), func.count().filter(flagged),
               func.count().filter(and_(flagged, not_(reviewed))))
        .join(ImageRecord, ImageRecord.id == Prediction.image_id)
        .where(ImageRecord.job_id.in_([j.id for j in jobs]), Prediction.model_version.in_(versions),
               ImageRecord.status.not_in(NOT_SHOWN_STATUSES))
        .group_by(ImageRecord.job_id, Prediction.model_version)
    ).all():
        counts[(job_id, version)] = (int(n), int(n_flagged or 0), int(n_unreviewed or 0))
    out = {}
    for job in jobs:
        shown = job.model_version
        if prod is not None and prod.version != job.model_version and job.scored:
            if counts.get((job.id, prod.version), (0, 0, 0))[0] >= job.scored:
                shown = prod.version
        _, n_flagged, n_unreviewed = counts.get((job.id, shown or ""), (0, 0, 0))
        out[job.id] = (n_flagged, n_unreviewed)
    return out


def split_filename(name: str) -> tuple[str, str]:
    """Split a file name into (stem, extension with its dot), so a page can wrap the stem and keep '.jpeg' whole."""
    dot = name.rfind(".")
    if dot <= 0 or len(name) - dot > 12 or " " in name[dot:]:
        return name, ""
    return name[:dot], name[dot:]
