"""Clinicians' reviews (issue 13): recording and validation, history, unreviewed counts, risk-order navigation,
the image page's form, the API, exports, clinic isolation, and that re-scoring leaves a review alone."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from typing import Any

import pytest
from fastweb import MODEL_VERSION, SentTasks
from flask import Flask
from flask.testing import FlaskClient
from realservices import Api
from sqlalchemy import select
from test_pages_fast import csrf_token, make_user, sign_in

Jpeg = Callable[..., bytes]
# File name -> malignancy score; flagged when >= 0.5. Risk order: a (0.9), d (0.8), b (0.7), c (0.3), e (0.1).
SCORES = {"a.jpg": 0.9, "b.jpg": 0.7, "c.jpg": 0.3, "d.jpg": 0.8, "e.jpg": 0.1}


def _score(settings: Any, job_id: str, scores: dict[str, float], version: str = MODEL_VERSION) -> dict[str, str]:
    """Write predictions for a job's images under a model version as a worker would; return filename -> id."""
    from skinscan.db import session_scope
    from skinscan.tables import ImageRecord, Job, Prediction

    ids = {}
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        for img in session.scalars(select(ImageRecord).where(ImageRecord.job_id == job_id)):
            ids[img.filename] = img.id
            if img.filename not in scores:
                continue
            m = scores[img.filename]
            label = "mel" if m >= 0.5 else "nv"
            probs = {"akiec": 0.0, "bcc": 0.0, "bkl": 0.0, "df": 0.0, "mel": m, "nv": 1 - m, "vasc": 0.0}
            session.add(Prediction(image_id=img.id, model_version=version, probabilities=probs, label=label,
                                   confidence=max(m, 1 - m), malignancy=m, flagged=m >= 0.5))
            img.status = "scored"
        job.scored, job.status, job.model_version = len(scores), "done", job.model_version or version
    return ids


def _job(api: Api, settings: Any, jpeg: Jpeg, scores: dict[str, float] = SCORES,
         extra: tuple[str, ...] = ()) -> tuple[str, dict[str, str]]:
    files = [(name, jpeg(i)) for i, name in enumerate([*scores, *extra])]
    job_id = api.submit(files).get_json()["id"]
    return job_id, _score(settings, job_id, scores)


def test_record_review_validates_and_keeps_history(api: Api, settings: Any, sent: SentTasks, jpeg: Jpeg) -> None:
    """Bad decisions, diagnoses and notes are refused with a clear message and store nothing; a second review
    adds a row (history), the latest is current, and each review is audited under its actor."""
    from skinscan.db import session_scope
    from skinscan.reviews import ReviewError, current_reviews, record_review, review_history
    from skinscan.tables import AuditEvent, ImageRecord, Review

    job_id, ids = _job(api, settings, jpeg, extra=("unscored.jpg",))
    with session_scope(settings) as session:
        image = session.get(ImageRecord, ids["a.jpg"])
        bad = [({"decision": "maybe"}, "decision must be one of agree, disagree, reviewed"),
               ({"decision": None}, "got 'nothing'"),
               ({"decision": "agree", "diagnosis": "melanoma"}, "diagnosis must be one of"),
               ({"decision": "agree", "note": "x" * 2001}, "at most 2000"),
               ({"decision": "agree", "note": "nul\x00byte"}, "control characters")]
        for fields, message in bad:
            with pytest.raises(ReviewError, match=re.escape(message)):
                record_review(session, image, reviewer="dr@x", user_id=None, version=MODEL_VERSION,
                              **fields)
        unscored = session.get(ImageRecord, ids["unscored.jpg"])
        with pytest.raises(ReviewError, match="no prediction"):
            record_review(session, unscored, decision="agree", reviewer="dr@x", user_id=None, version=MODEL_VERSION)
        assert session.scalar(select(Review.id)) is None
        first = record_review(session, image, decision=" Agree ", diagnosis="MEL", note="  looks atypical \r\n",
                              reviewer="dr@x", user_id=None, version=MODEL_VERSION, actor="user:dr@x")
        assert (first.decision, first.diagnosis, first.note) == ("agree", "mel", "looks atypical")
        assert first.model_version == MODEL_VERSION and first.flagged is True and first.job_id == job_id
        record_review(session, unscored, decision="reviewed", reviewer="dr@x", user_id=None, version=MODEL_VERSION)
    with session_scope(settings) as session:
        image = session.get(ImageRecord, ids["a.jpg"])
        second = record_review(session, image, decision="disagree", diagnosis="nv", reviewer="other@x",
                               user_id=None, version=MODEL_VERSION)
        second_id = second.id
    with session_scope(settings) as session:
        history = review_history(session, ids["a.jpg"])
        assert [(r.decision, r.reviewer) for r in history] == [("disagree", "other@x"), ("agree", "dr@x")]
        current = current_reviews(session, [ids["a.jpg"], ids["b.jpg"], ids["unscored.jpg"]])
        assert set(current) == {ids["a.jpg"], ids["unscored.jpg"]} and current[ids["a.jpg"]].id == second_id
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "image.review")
                                 .order_by(AuditEvent.id)).all()
        assert [(e.actor, e.target_id, e.details["decision"]) for e in events] == [
            ("user:dr@x", ids["a.jpg"], "agree"), ("dr@x", ids["unscored.jpg"], "reviewed"),
            ("other@x", ids["a.jpg"], "disagree")]


def test_unreviewed_count_and_risk_order_navigation(api: Api, settings: Any, sent: SentTasks, jpeg: Jpeg) -> None:
    """Flagged = the shown version's flag; j/k neighbours follow malignancy order; the next flagged, unreviewed
    image skips reviewed and unflagged ones and wraps to the top; none is left once all are reviewed."""
    from skinscan.db import session_scope
    from skinscan.reviews import (
        next_flagged_unreviewed,
        record_review,
        reviewed_count,
        risk_neighbours,
        unreviewed_flagged_count,
    )
    from skinscan.tables import ImageRecord, Job

    job_id, ids = _job(api, settings, jpeg)
    name = {v: k for k, v in ids.items()}
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        images = {n: session.get(ImageRecord, i) for n, i in ids.items()}
        assert unreviewed_flagged_count(session, job, MODEL_VERSION) == 3
        assert unreviewed_flagged_count(session, job, None) == 0
        order = []
        here = images["a.jpg"]
        while here is not None:
            order.append(here.filename)
            step = risk_neighbours(session, job, MODEL_VERSION, here)
            here = images[name[step.next]] if step.next else None
        assert order == ["a.jpg", "d.jpg", "b.jpg", "c.jpg", "e.jpg"]
        assert risk_neighbours(session, job, MODEL_VERSION, images["a.jpg"]).previous is None
        assert risk_neighbours(session, job, MODEL_VERSION, images["b.jpg"]).previous == ids["d.jpg"]

        def nxt(after: str | None, forward: bool = True) -> str | None:
            found = next_flagged_unreviewed(session, job, MODEL_VERSION, images[after] if after else None, forward)
            return name[found] if found else None

        assert [nxt(None), nxt("a.jpg"), nxt("d.jpg"), nxt("b.jpg"), nxt("c.jpg")] == [
            "a.jpg", "d.jpg", "b.jpg", "a.jpg", "a.jpg"]
        assert nxt("a.jpg", forward=False) == "b.jpg" and nxt("b.jpg", forward=False) == "d.jpg"
        record_review(session, images["d.jpg"], decision="agree", reviewer="r", user_id=None, version=MODEL_VERSION)
        record_review(session, images["e.jpg"], decision="reviewed", reviewer="r", user_id=None,
                      version=MODEL_VERSION)
        assert unreviewed_flagged_count(session, job, MODEL_VERSION) == 2 and reviewed_count(session, job) == 2
        assert nxt("a.jpg") == "b.jpg" and nxt("b.jpg") == "a.jpg"
        record_review(session, images["a.jpg"], decision="agree", reviewer="r", user_id=None, version=MODEL_VERSION)
        assert nxt("a.jpg") == "b.jpg" and nxt("b.jpg") is None
        record_review(session, images["b.jpg"], decision="agree", reviewer="r", user_id=None, version=MODEL_VERSION)
        assert unreviewed_flagged_count(session, job, MODEL_VERSION) == 0 and nxt(None) is None


def _page_user(app: Flask, settings: Any) -> tuple[FlaskClient, Api, str]:
    clinic_id, key, email = make_user(settings)
    client = app.test_client()
    assert sign_in(client, email).status_code == 302
    return client, Api(app.test_client(), key, clinic_id), email


def _unreviewed_on_job_page(client: FlaskClient, job_id: str) -> int:
    match = re.search(r'data-role="unreviewed">(\d+)</strong> flagged image', client.get(f"/jobs/{job_id}").text)
    return int(match.group(1)) if match else 0


def test_review_page_saves_and_goes_to_the_next_flagged_image(app: Flask, settings: Any, sent: SentTasks,
                                                              jpeg: Jpeg) -> None:
    """The image page shows the form, shortcuts script and navigation; a POST without the CSRF token is
    refused; a bad decision answers 400 keeping the note and storing nothing; a good one is stored under the
    signed-in user and leads to the next flagged, unreviewed image; the job page and jobs list count down."""
    from skinscan.db import session_scope
    from skinscan.tables import Review

    client, api, email = _page_user(app, settings)
    job_id, ids = _job(api, settings, jpeg)
    page = client.get(f"/images/{ids['a.jpg']}")
    assert page.status_code == 200
    html = page.text
    assert 'id="review-form"' in html and "js/review.js" in html and "Not reviewed yet" in html
    assert f'data-next-url="/images/{ids["d.jpg"]}"' in html and "data-prev-url" not in html
    assert "Next flagged, not reviewed" in html and "3 flagged images of this job not yet reviewed" in html
    assert _unreviewed_on_job_page(client, job_id) == 3
    assert re.search(r'data-role="unreviewed"[^>]*>3</td>', client.get("/jobs").text)

    url = f"/images/{ids['a.jpg']}/review"
    assert client.post(url, data={"decision": "agree"}).status_code == 400
    token = csrf_token(html)
    refused = client.post(url, data={"decision": "sure", "note": "keep me", "csrf_token": token})
    assert refused.status_code == 400 and "The review was not saved: decision must be one of" in refused.text
    assert "keep me</textarea>" in refused.text
    saved = client.post(url, data={"decision": "disagree", "diagnosis": "bkl", "note": "seborrhoeic",
                                   "csrf_token": token})
    assert saved.status_code == 302 and saved.headers["Location"].endswith(f"/images/{ids['d.jpg']}")
    with session_scope(settings) as session:
        review = session.scalars(select(Review)).one()
        assert (review.reviewer, review.decision, review.diagnosis, review.note) == (
            email, "disagree", "bkl", "seborrhoeic")
        assert review.user_id is not None and review.model_version == MODEL_VERSION
    assert _unreviewed_on_job_page(client, job_id) == 2
    again = client.get(f"/images/{ids['a.jpg']}").text
    assert f"Reviewed by {email}" in again and "Review history (1)" in again and "seborrhoeic" in again
    # A non-flagged image can be reviewed too; it still leads on to the next flagged, unreviewed image.
    nxt = client.post(f"/images/{ids['c.jpg']}/review", data={"decision": "reviewed", "csrf_token": token})
    assert nxt.headers["Location"].endswith(f"/images/{ids['d.jpg']}")
    for name in ("d.jpg", "b.jpg"):
        done = client.post(f"/images/{ids[name]}/review", data={"decision": "agree", "csrf_token": token})
    assert done.status_code == 302 and done.headers["Location"].endswith(f"/jobs/{job_id}")
    job_page = client.get(f"/jobs/{job_id}").text
    assert "All 3 flagged images have been reviewed" in job_page and _unreviewed_on_job_page(client, job_id) == 0

    stranger, _api, _email = _page_user(app, settings)
    other_token = csrf_token(stranger.get("/jobs").text)
    for path in (f"/images/{ids['e.jpg']}", f"/images/{ids['e.jpg']}/review"):
        assert stranger.post(path, data={"decision": "agree", "csrf_token": other_token}).status_code in (404, 405)
    assert stranger.post(f"/images/{ids['e.jpg']}/review",
                         data={"decision": "agree", "csrf_token": other_token}).status_code == 404
    with session_scope(settings) as session:
        assert len(session.scalars(select(Review)).all()) == 4


def test_exports_carry_the_current_review(app: Flask, settings: Any, sent: SentTasks, jpeg: Jpeg) -> None:
    """CSV (pages and API) and JSON exports carry review_decision, review_diagnosis, review_note, reviewed_by and
    reviewed_at of each image's latest review, empty for unreviewed images; a formula-like name or note stays text."""
    from skinscan.db import session_scope
    from skinscan.reviews import record_review
    from skinscan.tables import ImageRecord
    from web.results import CSV_COLUMNS

    client, api, email = _page_user(app, settings)
    job_id, ids = _job(api, settings, jpeg)
    with session_scope(settings) as session:
        a = session.get(ImageRecord, ids["a.jpg"])
        record_review(session, a, decision="agree", diagnosis="mel", reviewer=email, user_id=None,
                      version=MODEL_VERSION)
    with session_scope(settings) as session:
        a = session.get(ImageRecord, ids["a.jpg"])
        record_review(session, a, decision="disagree", diagnosis="nv", reviewer="=cmd|'/c calc'!A1", user_id=None,
                      version=MODEL_VERSION, note="=1+1 looks benign;\nsee again in 3 months")
    for body in (client.get(f"/jobs/{job_id}/results.csv").get_data(as_text=True),
                 api.get(f"/api/v1/jobs/{job_id}/results?format=csv").get_data(as_text=True)):
        table = list(csv.reader(io.StringIO(body)))
        assert table[0] == CSV_COLUMNS and CSV_COLUMNS[-5:] == [
            "review_decision", "review_diagnosis", "review_note", "reviewed_by", "reviewed_at"]
        rows = {r[1]: dict(zip(CSV_COLUMNS, r, strict=True)) for r in table[1:]}
        assert rows["a.jpg"]["review_decision"] == "disagree" and rows["a.jpg"]["review_diagnosis"] == "nv"
        assert rows["a.jpg"]["reviewed_by"] == "'=cmd|'/c calc'!A1" and rows["a.jpg"]["reviewed_at"].endswith("+00:00")
        assert rows["a.jpg"]["review_note"] == "'=1+1 looks benign;\nsee again in 3 months"
        assert [rows["b.jpg"][c] for c in CSV_COLUMNS[-5:]] == ["", "", "", "", ""]
    results = {r["filename"]: r for r in client.get(f"/jobs/{job_id}/results.json").get_json()["results"]}
    assert results["a.jpg"]["review_decision"] == "disagree" and results["b.jpg"]["reviewed_by"] is None
    assert results["a.jpg"]["review_note"] == "=1+1 looks benign;\nsee again in 3 months"
    api_rows = {r["filename"]: r for r in api.get(f"/api/v1/jobs/{job_id}/results").get_json()["results"]}
    assert api_rows["a.jpg"]["review_diagnosis"] == "nv"


def test_reviews_api_is_clinic_scoped(new_api: Callable[[], Api], settings: Any, sent: SentTasks,
                                      jpeg: Jpeg) -> None:
    """POST /images/<id>/review records a review under the key's label (no user); GET /jobs/<id>/reviews lists
    them with the current one marked; bad bodies answer 400; another clinic gets 404 for both."""
    owner, stranger = new_api(), new_api()
    job_id, ids = _job(owner, settings, jpeg)

    def post(who: Api, image_id: str, body: Any) -> Any:
        return who.client.post(f"/api/v1/images/{image_id}/review", json=body, headers=who.headers())

    assert post(owner, ids["a.jpg"], None).status_code == 400
    assert post(owner, ids["a.jpg"], {"decision": 1}).get_json()["error"] == "decision must be a string or null"
    bad = post(owner, ids["a.jpg"], {"decision": "agree", "diagnosis": "xyz"})
    assert bad.status_code == 400 and "diagnosis must be one of" in bad.get_json()["error"]
    created = post(owner, ids["a.jpg"], {"decision": "agree", "diagnosis": "mel", "note": "urgent"})
    assert created.status_code == 201
    body = created.get_json()
    assert body["review"]["reviewer"].startswith("api-key:") and body["review"]["by_user"] is False
    assert body["unreviewed_flagged"] == 2 and body["next_flagged_unreviewed"] == ids["d.jpg"]
    assert post(owner, ids["a.jpg"], {"decision": "reviewed"}).status_code == 201
    listing = owner.get(f"/api/v1/jobs/{job_id}/reviews").get_json()
    assert listing["total"] == 2 and listing["unreviewed_flagged"] == 2
    assert [(r["decision"], r["current"]) for r in listing["reviews"]] == [("agree", False), ("reviewed", True)]
    assert post(stranger, ids["b.jpg"], {"decision": "agree"}).status_code == 404
    assert post(stranger, "x" * 100, {"decision": "agree"}).status_code == 404
    assert stranger.get(f"/api/v1/jobs/{job_id}/reviews").status_code == 404
    assert owner.client.post(f"/api/v1/images/{ids['b.jpg']}/review", json={"decision": "agree"}).status_code == 401
    assert owner.get(f"/api/v1/jobs/{job_id}/reviews").get_json()["total"] == 2


def test_rescoring_never_changes_a_review(api: Api, settings: Any, sent: SentTasks, jpeg: Jpeg) -> None:
    """A new production model's predictions leave stored reviews as they were (with the model the reviewer saw);
    the unreviewed count then follows the new model's flags."""
    from skinscan.db import session_scope
    from skinscan.reviews import current_reviews, record_review, unreviewed_flagged_count
    from skinscan.tables import ImageRecord, Job, ModelVersion, utcnow
    from web.pages.table import results_version

    job_id, ids = _job(api, settings, jpeg)
    with session_scope(settings) as session:
        record_review(session, session.get(ImageRecord, ids["a.jpg"]), decision="agree", diagnosis="mel",
                      note="refer", reviewer="dr@x", user_id=None, version=MODEL_VERSION)
    with session_scope(settings) as session:
        before = {c.name: getattr(r, c.name) for r in current_reviews(session, [ids["a.jpg"]]).values()
                  for c in r.__table__.columns}
        session.get(ModelVersion, MODEL_VERSION).status = "retired"
        session.flush()
        session.add(ModelVersion(version="fast-test-model-v2", architecture="x", path="/", checksum="1" * 64,
                                 meta={}, status="production", promoted_at=utcnow()))
    _score(settings, job_id, {"a.jpg": 0.2, "b.jpg": 0.6, "c.jpg": 0.9, "d.jpg": 0.1, "e.jpg": 0.1},
           version="fast-test-model-v2")
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        assert results_version(session, job) == "fast-test-model-v2"
        after = {c.name: getattr(r, c.name) for r in current_reviews(session, [ids["a.jpg"]]).values()
                 for c in r.__table__.columns}
        assert after == before and after["model_version"] == MODEL_VERSION and after["flagged"] is True
        assert unreviewed_flagged_count(session, job, "fast-test-model-v2") == 2  # b and c, new flags


def test_a_cancelled_image_is_not_waiting_for_review(api: Api, settings: Any, sent: SentTasks, jpeg: Jpeg) -> None:
    """An image cancelled with its job is not counted or offered for review, even with a flagged prediction that
    a chunk in flight wrote (the job page's flagged count leaves it out too)."""
    from skinscan.db import session_scope
    from skinscan.reviews import next_flagged_unreviewed, risk_neighbours, unreviewed_flagged_count
    from skinscan.tables import ImageRecord, Job

    job_id, ids = _job(api, settings, jpeg)
    with session_scope(settings) as session:
        session.get(ImageRecord, ids["d.jpg"]).status = "cancelled"
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        a = session.get(ImageRecord, ids["a.jpg"])
        assert unreviewed_flagged_count(session, job, MODEL_VERSION) == 2
        assert next_flagged_unreviewed(session, job, MODEL_VERSION, a) == ids["b.jpg"]
        assert risk_neighbours(session, job, MODEL_VERSION, a).next == ids["b.jpg"]


def test_jobs_list_counts_flagged_and_unreviewed_in_a_fixed_number_of_queries(
        app: Flask, settings: Any, sent: SentTasks, jpeg: Jpeg) -> None:
    """Each row of the jobs list shows its job's flagged and flagged-but-unreviewed counts; the page's queries do
    not grow with the number of jobs listed (one grouped query for the counts of the whole page)."""
    from sqlalchemy import event

    from skinscan.db import get_engine, session_scope
    from skinscan.reviews import record_review
    from skinscan.tables import ImageRecord

    client, api, _ = _page_user(app, settings)

    def listed() -> tuple[dict[str, tuple[int, int]], int]:
        seen: list[str] = []
        engine = get_engine(settings)
        event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
        try:
            html = client.get("/jobs").text
        finally:
            engine.dispatch.before_cursor_execute.clear()
        rows = re.findall(r'href="/jobs/([0-9a-f]+)".*?data-role="flagged">(\d+)</td>\s*'
                          r'<td[^>]*data-role="unreviewed"[^>]*>(\d+)</td>', html, re.S)
        return {j: (int(f), int(u)) for j, f, u in rows}, len(seen)

    first, _ = _job(api, settings, jpeg)
    second, ids = _job(api, settings, jpeg, {"a.jpg": 0.9, "b.jpg": 0.2})
    with session_scope(settings) as session:
        record_review(session, session.get(ImageRecord, ids["a.jpg"]), decision="agree", reviewer="r",
                      user_id=None, version=MODEL_VERSION)
    counts, queries_two_jobs = listed()
    assert counts == {first: (3, 3), second: (1, 0)}
    for _ in range(4):
        _job(api, settings, jpeg)
    counts, queries_six_jobs = listed()
    assert len(counts) == 6 and counts[second] == (1, 0)
    assert queries_six_jobs == queries_two_jobs
