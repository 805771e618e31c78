"""What a request names, looked up for the clinic that asks: its jobs and images by id, whole-number query
parameters. One definition for the JSON API and the pages; each answers a miss in its own format."""

from __future__ import annotations

from typing import NoReturn, TypeVar

from flask import abort, g, request

from skinscan.tables import ImageRecord, Job
from web.context import db
from web.errors import ApiError, wants_json

Owned = TypeVar("Owned", Job, ImageRecord)
MAX_ID_LENGTH = 64


def owned(model: type[Owned], row_id: str, what: str) -> Owned:
    """Return the signed-in clinic's row of `model`, or 404 (also for another clinic's): JSON for API calls."""
    row = db().get(model, row_id) if len(row_id) <= MAX_ID_LENGTH else None
    if row is None or row.clinic_id != g.clinic.id:
        not_found(what)
    return row


def not_found(what: str) -> NoReturn:
    """Answer 404: JSON for API calls, the error page otherwise."""
    if wants_json():
        raise ApiError(f"{what} not found", 404)
    abort(404)


def owned_job(job_id: str) -> Job:
    """Return the signed-in clinic's job, or 404."""
    return owned(Job, job_id, "job")


def owned_image(image_id: str) -> ImageRecord:
    """Return the signed-in clinic's image, or 404."""
    return owned(ImageRecord, image_id, "image")


def int_arg(name: str, default: int, low: int, high: int, strict: bool = False) -> int:
    """Return a whole-number query parameter in [low, high]; the default when absent.

    strict (the API): a value that is not a whole number or out of range answers 400 saying so; otherwise (the
    pages, where a hand-edited address should still show something) it falls back to the default or is clamped.
    """
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        if strict:
            raise ApiError(f"query parameter {name!r} must be a whole number", 400) from None
        return default
    if strict and not low <= value <= high:
        raise ApiError(f"query parameter {name!r} must be between {low} and {high}", 400)
    return max(low, min(high, value))
