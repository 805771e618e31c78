"""A small file that decodes to a huge high-depth image fails alone with its reason, at upload and in the worker,
on real PostgreSQL and an S3 server (issue 12, point 7); tests/test_imaging.py measures the memory."""

from __future__ import annotations

from pathlib import Path

import pytest
from private_services import make_client
from sqlalchemy import select
from tests_helpers import sixteen_bit_png

from skinscan.db import session_scope
from skinscan.tables import ImageRecord

pytestmark = [pytest.mark.services]

REASON = "16-bit image too large to decode safely (7000x7000 pixels"


@pytest.fixture(scope="module")
def good_images(ham_dir: Path) -> list[tuple[str, bytes]]:
    """Three real HAM10000 images as (name, bytes)."""
    paths = sorted((ham_dir / "images").glob("ISIC_*.jpg"))[4000:4003]
    return [(p.name, p.read_bytes()) for p in paths]


def test_sixteen_bit_bomb_is_refused_alone_at_upload(stack, good_images) -> None:  # type: ignore[no-untyped-def]
    """A 16-bit PNG of 49 megapixels in a batch is refused with its reason; the rest of the batch is accepted."""
    bomb = sixteen_bit_png(7000, 7000)
    client = make_client(stack.settings())
    resp = client.submit([*good_images, ("bomb16.png", bomb)])
    assert resp.status_code == 202, resp.get_json()
    body = resp.get_json()
    assert body["accepted"] == len(good_images)
    assert [(r["filename"], r["status"]) for r in body["rejected"]] == [("bomb16.png", 400)]
    assert REASON in body["rejected"][0]["error"]


def test_sixteen_bit_bomb_already_stored_fails_alone_in_the_worker(stack, good_images) -> None:  # type: ignore[no-untyped-def]
    """An image stored before the limit existed fails in the worker with the reason; its chunk-mates are scored."""
    from skinscan.storage import get_storage
    from worker import pipeline

    settings = stack.settings()
    client = make_client(settings)
    job_id = client.submit(good_images).get_json()["id"]
    with session_scope(settings) as session:
        rows = session.execute(select(ImageRecord.id, ImageRecord.storage_key).where(ImageRecord.job_id == job_id)
                               .order_by(ImageRecord.position)).all()
    get_storage(settings).put(rows[1][1], sixteen_bit_png(7000, 7000), "image/png")
    pipeline.score_chunk(job_id, [i for i, _ in rows], settings)
    with session_scope(settings) as session:
        outcome = {r.id: (r.status, r.error) for r in session.scalars(
            select(ImageRecord).where(ImageRecord.job_id == job_id))}
    assert outcome[rows[1][0]][0] == "failed" and REASON in outcome[rows[1][0]][1]
    assert [outcome[i][0] for i, _ in rows if i != rows[1][0]] == ["scored", "scored"]
    assert client.wait(job_id)["counts"] == {"total": 3, "scored": 2, "failed": 1, "refused": 0}
