"""Which model version's predictions a job shows, and the job's risk order: rank 1 is its highest malignancy score.

The page's results table, its "#" column and the CSV/JSON exports all use this one order (malignancy score under
the shown version, highest first, then upload order, then image id; unscored and cancelled images last), so an
export lists the images in the order a clinician saw them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from skinscan.model.registry import production_model
from skinscan.tables import ImageRecord, Job, Prediction

# Images whose prediction is never shown: a cancelled image is not scored (a chunk in flight writes no prediction
# for it; one written before that rule, by an older version, is ignored).
NOT_SHOWN_STATUSES = ("cancelled",)


def results_version(session: Session, job: Job) -> str | None:
    """The model version whose predictions the pages show: production's once it scored the whole job."""
    prod = production_model(session)
    if prod is None or prod.version == job.model_version or not job.scored:
        return job.model_version
    n = session.scalar(select(func.count()).select_from(Prediction)
                       .join(ImageRecord, ImageRecord.id == Prediction.image_id)
                       .where(ImageRecord.job_id == job.id, Prediction.model_version == prod.version)) or 0
    return prod.version if n >= job.scored else job.model_version


def shown_join(version: str | None) -> ColumnElement[bool]:
    """Join condition of an image with its shown prediction (none for a cancelled image)."""
    return and_(Prediction.image_id == ImageRecord.id, Prediction.model_version == version,
                ImageRecord.status.not_in(NOT_SHOWN_STATUSES))


def risk_order() -> tuple[Any, Any, Any]:
    """ORDER BY of the risk order: malignancy score under the joined version, highest first, then upload order,
    then image id (positions can tie: the order is total, so pages never overlap or skip)."""
    return Prediction.malignancy.desc().nulls_last(), ImageRecord.position, ImageRecord.id


# The risk order's score as one sortable value: a malignancy score is 0..1, so no score (unscored, cancelled)
# sorts last, as NULLS LAST does; keyset pages compare against it.
RISK_KEY = func.coalesce(Prediction.malignancy, -1.0)
RiskCursor = tuple[float, int, str]  # (risk key, position, image id) of the last row of a page


def risk_page(session: Session, job: Job, version: str | None, limit: int,
              after: RiskCursor | None = None) -> tuple[list[ImageRecord], RiskCursor | None]:
    """One page of a job's images in risk order after a cursor (keyset: the cost of a page does not grow with how
    far into the order it is); return the images and the cursor of the last, None when there are none."""
    stmt = (select(ImageRecord, RISK_KEY).outerjoin(Prediction, shown_join(version))
            .where(ImageRecord.job_id == job.id))
    if after is not None:
        key, position, image_id = after
        stmt = stmt.where(or_(RISK_KEY < key, and_(RISK_KEY == key, or_(
            ImageRecord.position > position, and_(ImageRecord.position == position, ImageRecord.id > image_id)))))
    rows = session.execute(stmt.order_by(RISK_KEY.desc(), ImageRecord.position, ImageRecord.id).limit(limit)).all()
    if not rows:
        return [], None
    last, key = rows[-1]
    return [image for image, _ in rows], (float(key), last.position, last.id)


def ranked_ids(job: Job, version: str | None) -> Any:
    """Subquery of (image_id, rank) over all the job's images, rank 1 the highest malignancy score."""
    return (select(ImageRecord.id.label("image_id"), func.row_number().over(order_by=risk_order()).label("rank"))
            .outerjoin(Prediction, shown_join(version)).where(ImageRecord.job_id == job.id).subquery())
