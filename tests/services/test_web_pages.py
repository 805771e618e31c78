"""The clinic's web pages on real services: sign-in, CSRF, upload, progress, results table, exports, images,
Grad-CAM heatmaps and isolation between clinics (Flask test client; PostgreSQL, Redis, S3, Celery worker)."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage

PASSWORD = "correct horse battery"


# --- helpers -------------------------------------------------------------------------------------------------

def private_redis(stack: Any) -> str:
    """A Redis database for this test alone: workers of other test runs on this machine listen on the stack's."""
    return f"{stack.redis_url.rsplit('/', 1)[0]}/{10 + uuid.uuid4().int % 6}"


def make_user(settings: Any, clinic: str | None = None, password: str = PASSWORD) -> tuple[str, str]:
    """Create a clinic and a web user for it; return (clinic id, email)."""
    from skinscan.db import session_scope
    from skinscan.security import hash_password
    from skinscan.tables import Clinic, User

    clinic = clinic or f"clinic-{uuid.uuid4().hex[:6]}"
    email = f"staff-{uuid.uuid4().hex[:6]}@{clinic}.example"
    with session_scope(settings) as session:
        row = Clinic(name=clinic)
        session.add(row)
        session.flush()
        session.add(User(clinic_id=row.id, email=email, password_hash=hash_password(password)))
        return row.id, email


class Rows(HTMLParser):
    """Collect the data-* attributes of the results table's rows, in page order."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        data = {k[5:]: v or "" for k, v in attrs if k.startswith("data-")}
        if tag == "tr" and "image-id" in data:
            self.rows.append(data)


def table_rows(html: str) -> list[dict[str, str]]:
    """The results rows of a job page."""
    parser = Rows()
    parser.feed(html)
    return parser.rows


class Staff:
    """A signed-in browser session of one clinic user, on the Flask test client."""

    def __init__(self, app: Any, email: str, password: str = PASSWORD) -> None:
        self.client = app.test_client()
        page = self.client.get("/signin")
        assert page.status_code == 200
        response = self.client.post("/signin", data={"email": email, "password": password,
                                                     "csrf_token": csrf_token(page.text)})
        assert response.status_code == 302, response.text
        self.token = csrf_token(self.client.get("/jobs").text)

    def get(self, url: str, **kwargs: Any) -> Any:
        """GET a page."""
        return self.client.get(url, **kwargs)

    def get_json(self, url: str) -> Any:
        """GET a JSON route the pages poll."""
        return self.client.get(url, headers={"Accept": "application/json"})

    def upload(self, files: list[tuple[str, bytes]], labels: bytes | None = None, xhr: bool = True) -> Any:
        """POST the new-job form as the page's script does (xhr) or as a plain HTML form."""
        data: dict[str, Any] = {"csrf_token": self.token, "files": [(io.BytesIO(b), n) for n, b in files]}
        if labels is not None:
            data["labels"] = (io.BytesIO(labels), "labels.csv")
        headers = {"Accept": "application/json"} if xhr else {}
        return self.client.post("/jobs/new", data=data, headers=headers, content_type="multipart/form-data")

    def wait(self, job_id: str, timeout: float = 300) -> dict[str, Any]:
        """Poll the session-authenticated status route until the job is done or failed."""
        deadline = time.monotonic() + timeout
        while True:
            body = self.get_json(f"/jobs/{job_id}/status").get_json()
            if body["status"] in ("done", "failed"):
                return body
            assert time.monotonic() < deadline, f"job {job_id} still {body['status']} after {timeout}s"
            time.sleep(0.5)


def csrf_token(html: str) -> str:
    """The CSRF token a page carries (hidden form field or meta tag)."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', html) or re.search(
        r'name="csrf-token" content="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def noise_png(side: int, seed: int = 0) -> bytes:
    """A real PNG of random pixels (incompressible, so its size is about 3 * side**2 bytes)."""
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def add_plots_and_card(bundle: Any) -> None:
    """Give a bundle folder the evaluation plots `skinscan evaluate` writes and a model card, as a release has."""
    from training.evaluate import plot_confusion, plot_reliability, plot_roc

    rng = np.random.default_rng(0)
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    y = np.arange(70) % 7
    probs = rng.dirichlet(np.ones(7), 70)
    plot_confusion(rng.integers(0, 9, (7, 7)), classes, bundle / "isic2017_confusion.png", "test")
    plot_roc(y, probs, classes, bundle / "isic2017_roc.png", "test")
    plot_reliability(y, probs, probs, 1.0, bundle / "isic2017_reliability.png", "test")
    (bundle / "MODEL_CARD.md").write_text("# SkinScan model\n\n## Intended use\n\nDecision support.\n\n"
                                          "| Set | AUC |\n|---|---|\n| val | 0.9 |\n\n- one\n- two\n")


def score_in_process(settings: Any, job_id: str) -> None:
    """Run the real scoring pipeline for a job's pending images in this process (no worker needed)."""
    from skinscan.db import session_scope
    from skinscan.jobs.dispatch import pending_image_ids
    from worker import pipeline

    with session_scope(settings) as session:
        ids = pending_image_ids(session, job_id)
    pipeline.score_chunk(job_id, ids, settings)


def db_predictions(settings: Any, job_id: str) -> dict[str, Any]:
    """image id -> Prediction of a job, read straight from the database."""
    from sqlalchemy import select

    from skinscan.db import session_scope
    from skinscan.tables import ImageRecord, Prediction

    with session_scope(settings) as session:
        rows = session.execute(select(Prediction).join(ImageRecord, ImageRecord.id == Prediction.image_id)
                               .where(ImageRecord.job_id == job_id)).scalars().all()
        session.expunge_all()
        return {p.image_id: p for p in rows}


# --- tests ---------------------------------------------------------------------------------------------------

@pytest.mark.services
def test_sign_in_sessions_and_csrf(stack):
    """Pages need a session; every form needs its CSRF token (400 without); the bearer API is exempt."""
    from web import create_app

    settings = stack.settings()
    app = create_app(settings)
    _clinic, email = make_user(settings)
    client = app.test_client()

    for url in ("/jobs", "/jobs/new", "/model", "/jobs/abc", "/images/abc", "/images/abc/thumb"):
        response = client.get(url)
        assert response.status_code == 302 and "/signin?next=" in response.headers["Location"], url
    assert client.get("/jobs/abc/status", headers={"Accept": "application/json"}).status_code == 401
    assert client.get("/").headers["Location"].endswith("/signin")

    page = client.get("/signin")
    assert page.status_code == 200 and "Decision support, not a diagnosis" in page.text
    token = csrf_token(page.text)
    refused = client.post("/signin", data={"email": email, "password": PASSWORD})
    assert refused.status_code == 400 and "security token" in refused.text
    assert client.get("/jobs").status_code == 302

    wrong = client.post("/signin", data={"email": email, "password": "not the password", "csrf_token": token})
    assert wrong.status_code == 401 and "Email or password is not right" in wrong.text
    unknown = client.post("/signin", data={"email": "nobody@example.org", "password": PASSWORD, "csrf_token": token})
    assert unknown.status_code == 401
    assert client.get("/jobs").status_code == 302

    # An off-site `next` is ignored; a local one is followed.
    ok = client.post("/signin", data={"email": email.upper(), "password": PASSWORD, "csrf_token": token,
                                      "next": "//evil.example/x"})
    assert ok.status_code == 302 and ok.headers["Location"] == "/jobs"
    jobs = client.get("/jobs")
    assert jobs.status_code == 200 and email in jobs.text and "not a diagnosis" in jobs.text
    assert "Content-Security-Policy" in jobs.headers and "script-src 'self'" in jobs.headers["Content-Security-Policy"]
    assert "<script>" not in jobs.text and " style=" not in jobs.text  # nothing inline for the CSP to block

    # Forms without the token are refused and change nothing.
    token = csrf_token(jobs.text)
    no_token = client.post("/jobs/new", data={"files": [(io.BytesIO(noise_png(32)), "a.png")]},
                           content_type="multipart/form-data")
    assert no_token.status_code == 400
    assert client.post("/jobs/new", data={"files": [(io.BytesIO(noise_png(32)), "a.png")]},
                       headers={"Accept": "application/json"},
                       content_type="multipart/form-data").get_json()["status"] == 400
    assert client.post("/signout").status_code == 400
    assert client.get("/jobs").status_code == 200
    from sqlalchemy import func, select

    from skinscan.db import session_scope
    from skinscan.tables import AuditEvent, Job

    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.scalar(select(func.count()).select_from(AuditEvent)
                              .where(AuditEvent.action == "user.sign_in")) == 1

    # The bearer-key API is not subject to CSRF (it answers about the missing files, not a token).
    from skinscan.security import create_api_key
    from skinscan.tables import Clinic

    with session_scope(settings) as session:
        key = create_api_key(session, session.scalars(select(Clinic)).first())
    api = client.post("/api/v1/jobs", headers={"Authorization": f"Bearer {key}"}, data={},
                      content_type="multipart/form-data")
    assert api.status_code == 400 and "token" not in api.get_json()["error"]

    # Sign-out with the token ends the session; a password change ends the others.
    assert client.post("/signout", data={"csrf_token": token}).status_code == 302
    assert client.get("/jobs").status_code == 302
    other = Staff(app, email)
    assert other.get("/jobs").status_code == 200
    from skinscan.security import hash_password
    from skinscan.tables import User

    with session_scope(settings) as session:
        user = session.scalars(select(User).where(User.email == email)).one()
        user.password_hash = hash_password("a brand new password")
    assert other.get("/jobs").status_code == 302


@dataclass
class ScoredUpload:
    """A job uploaded through the new-job form (20 real ISIC images with labels, a text file and an oversize
    image among them) and scored by a worker; the tests below read its pages."""

    settings: Any
    staff: Staff
    upload: list[tuple[str, bytes]]
    response: Any  # the form's answer
    live_page: str  # the job page while the job was queued or running
    summary: dict[str, Any]  # the status when it was done
    preds: dict[str, Any]  # image id -> Prediction

    @property
    def job_id(self) -> str:
        """The uploaded job's id."""
        return str(self.response.get_json()["job_id"])

    def rows(self, query: str = "") -> list[dict[str, str]]:
        """The job page's results table (with a query string)."""
        return table_rows(self.staff.get(f"/jobs/{self.job_id}{query}").text)

    def filenames(self) -> dict[str, str]:
        """Image id -> uploaded file name."""
        from skinscan.db import session_scope
        from skinscan.tables import ImageRecord

        with session_scope(self.settings) as session:
            return {i.id: i.filename for i in session.query(ImageRecord).filter(ImageRecord.job_id == self.job_id)}


@pytest.fixture(scope="module")
def scored_upload(module_stack: Any, isic_test_images: Any, smoke_run: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> ScoredUpload:
    """Upload through the form as the page's script does, then wait for the worker to score the job."""
    from web import create_app

    bundle = tmp_path_factory.mktemp("pages-bundle") / "bundle"
    shutil.copytree(smoke_run / "bundle", bundle)
    add_plots_and_card(bundle)
    module_stack.env.update({"SKINSCAN_MAX_FILE_BYTES": "400000", "SKINSCAN_MODEL": str(bundle),
                             "REDIS_URL": private_redis(module_stack)})
    settings = module_stack.settings()
    module_stack.worker()
    _clinic, email = make_user(settings)
    staff = Staff(create_app(settings), email)
    files, labels = isic_test_images(20)
    big = noise_png(400)  # about 480 kB > the 400 kB limit set above
    assert len(big) > 400_000 and all(len(b) < 400_000 for _, b in files)
    upload = [*files[:10], ("notes.txt", b"not an image at all"), ("huge.png", big), *files[10:]]
    response = staff.upload(upload, labels)
    assert response.status_code == 201, response.text
    job_id = response.get_json()["job_id"]
    live = staff.get(f"/jobs/{job_id}")
    assert live.status_code == 200
    summary = staff.wait(job_id)
    return ScoredUpload(settings, staff, upload, response, live.text, summary, db_predictions(settings, job_id))


@pytest.mark.services
@pytest.mark.slow
def test_upload_form_takes_images_and_names_each_refused_file(scored_upload: ScoredUpload) -> None:
    """The form takes files and a labels CSV; a wrong type (415) and an oversize file (413) are refused one by one
    while the rest of the batch goes on; the job is listed."""
    form = scored_upload.staff.get("/jobs/new")
    assert form.status_code == 200
    assert 'type="file"' in form.text and "multiple" in form.text and 'for="files"' in form.text
    body = scored_upload.response.get_json()
    assert body["accepted"] == 20
    rejected = {r["filename"]: r for r in body["rejected"]}
    assert set(rejected) == {"notes.txt", "huge.png"}
    assert rejected["notes.txt"]["status"] == 415 and rejected["huge.png"]["status"] == 413
    assert "limit" in rejected["huge.png"]["error"]
    assert body["job_url"] == f"/jobs/{scored_upload.job_id}"
    listing = scored_upload.staff.get("/jobs").text
    assert f'href="/jobs/{scored_upload.job_id}"' in listing and "smoke-test" in listing


@pytest.mark.services
@pytest.mark.slow
def test_job_page_shows_progress_counts_metrics_and_refusals(scored_upload: ScoredUpload) -> None:
    """While it runs the page has a live progress bar; done, it shows the counts, the agreement with the labels,
    the refused files and the referral count."""
    assert 'id="job-progress-bar"' in scored_upload.live_page and 'aria-live="polite"' in scored_upload.live_page
    summary = scored_upload.summary
    assert summary["status"] == "done" and summary["progress"] == 1.0
    assert summary["counts"] == {"total": 20, "scored": 20, "failed": 0, "refused": 2}
    preds = scored_upload.preds
    assert len(preds) == 20
    page = scored_upload.staff.get(f"/jobs/{scored_upload.job_id}")
    html = page.text
    assert page.status_code == 200
    assert 'value="100.0"' in html and "20 of 20 images finished" in html
    assert "Agreement with your labels" in html and "Confusion matrix" in html
    assert "notes.txt" in html and "huge.png" in html and "not a recognised image file" in html
    flagged = sum(1 for p in preds.values() if p.flagged)
    assert re.search(rf'Flagged for referral</dt>\s*<dd><a [^>]*>{flagged}</a>', html)
    assert "not a diagnosis" in html


@pytest.mark.services
@pytest.mark.slow
def test_results_table_sorts_filters_and_pages(scored_upload: ScoredUpload) -> None:
    """Highest malignancy first by default (the refused files have their own section); sorting both ways on
    several columns; filters by class and flag counted in SQL; pages cover every row once, in order."""
    preds = scored_upload.preds
    rows = scored_upload.rows()
    assert len(rows) == 20
    scores = [float(r["malignancy"]) for r in rows if r["malignancy"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 20
    for r in rows:
        p = preds[r["image-id"]]
        assert r["label"] == p.label and abs(float(r["malignancy"]) - p.malignancy) < 1e-9

    asc = scored_upload.rows("?sort=malignancy&dir=asc")
    assert [float(r["malignancy"]) for r in asc if r["malignancy"]] == sorted(scores)
    probs = [float(r["confidence"]) for r in scored_upload.rows("?sort=probability") if r["confidence"]]
    assert probs == sorted(probs, reverse=True)
    names = scored_upload.filenames()
    order = [n for n, _ in scored_upload.upload if n not in ("notes.txt", "huge.png")]  # the images, refusals apart
    assert [names[r["image-id"]] for r in scored_upload.rows("?sort=upload")] == order
    by_file = [names[r["image-id"]] for r in scored_upload.rows("?sort=file&dir=desc")]
    isic = [n for n in by_file if n.startswith("ISIC_")]  # other names sort by the database's collation
    assert isic == sorted(isic, reverse=True) and len(isic) == 20

    top_label = max({p.label for p in preds.values()}, key=lambda c: sum(p.label == c for p in preds.values()))
    only = scored_upload.rows(f"?class={top_label}&per_page=200")
    assert len(only) == sum(p.label == top_label for p in preds.values()) and {r["label"] for r in only} == {top_label}
    flagged = sum(1 for p in preds.values() if p.flagged)
    flagged_rows = scored_upload.rows("?flag=yes&per_page=200")
    assert len(flagged_rows) == flagged and all(r["flagged"] == "1" for r in flagged_rows)
    assert len(scored_upload.rows("?flag=no&per_page=200")) == 20 - flagged

    seen = []
    for n in (1, 2):
        part = scored_upload.staff.get(f"/jobs/{scored_upload.job_id}?per_page=10&page={n}").text
        seen += [r["image-id"] for r in table_rows(part)]
        assert f"Showing {(n - 1) * 10 + 1}–{n * 10} of 20 images" in part
    assert seen == [r["image-id"] for r in rows]
    assert scored_upload.rows("?per_page=10&page=99")[-1]["image-id"] == rows[-1]["image-id"]


@pytest.mark.services
@pytest.mark.slow
def test_exports_carry_every_row(scored_upload: ScoredUpload) -> None:
    """The CSV (a download) and the JSON export hold the 20 images and the 2 refused files."""
    exported = scored_upload.staff.get(f"/jobs/{scored_upload.job_id}/results.csv")
    assert exported.status_code == 200 and exported.mimetype == "text/csv"
    assert "attachment" in exported.headers["Content-Disposition"]
    csv_rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert len(csv_rows) == 22
    for r in csv_rows:
        if r["status"] == "scored":
            assert abs(float(r["malignancy_score"]) - scored_upload.preds[r["image_id"]].malignancy) < 1e-5
            assert r["true_label"] in ("mel", "bkl", "nv")
    as_json = json.loads(scored_upload.staff.get(f"/jobs/{scored_upload.job_id}/results.json").data)
    assert as_json["job"]["id"] == scored_upload.job_id and len(as_json["results"]) == 22


@pytest.mark.services
@pytest.mark.slow
def test_image_page_file_thumbnail_and_heat_map_grid(scored_upload: ScoredUpload) -> None:
    """The image page (never its storage key), the original file, a cached thumbnail, and the Grad-CAM grid kept
    with the prediction while scoring, drawn by the page with no heat-map task."""
    from skinscan.db import session_scope
    from skinscan.model.heatmaps import heatmap_key
    from skinscan.storage import get_storage
    from skinscan.tables import ImageRecord

    staff, settings = scored_upload.staff, scored_upload.settings
    image_id = scored_upload.rows()[0]["image-id"]
    image_page = staff.get(f"/images/{image_id}")
    assert image_page.status_code == 200
    assert "Class probabilities" in image_page.text
    with session_scope(settings) as session:
        key = session.get(ImageRecord, image_id).storage_key
    assert key and key not in image_page.text and settings.s3_bucket not in image_page.text
    assert "flagged" in image_page.text.lower() and "referral threshold" in image_page.text
    original = staff.get(f"/images/{image_id}/file")
    assert original.status_code == 200 and original.mimetype == "image/jpeg"
    assert PILImage.open(io.BytesIO(original.data)).size == (256, 256)
    thumb = staff.get(f"/images/{image_id}/thumb")
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg"
    assert max(PILImage.open(io.BytesIO(thumb.data)).size) <= 160
    assert "max-age" in thumb.headers["Cache-Control"] and thumb.headers.get("ETag")
    again = staff.get(f"/images/{image_id}/thumb", headers={"If-None-Match": thumb.headers["ETag"]})
    assert again.status_code == 304

    # The smoke bundle (EfficientNet-Lite0: global pool + linear head) outputs its feature map: the Grad-CAM grid
    # was kept with the prediction while scoring (2 x 2 at 64 px) and the page draws it; no heat-map task, no PNG.
    state = staff.get_json(f"/images/{image_id}/heatmap")
    assert state.status_code == 200 and state.get_json()["state"] == "grid", state.text
    grid = state.get_json()["grid"]
    assert len(grid) == 2 and all(len(row) == 2 and all(0 <= v <= 1 for v in row) for row in grid)
    assert 'id="heatmap-canvas"' in image_page.text and "data-grid=" in image_page.text
    with session_scope(settings) as session:
        record = session.get(ImageRecord, image_id)
        gradcam = heatmap_key(record, "smoke-test").rsplit("/", 1)[0]
    assert not get_storage(settings).list_keys(gradcam), "the page asked a worker for a heat map"


@pytest.mark.services
@pytest.mark.slow
def test_model_page_shows_the_card_and_its_plots(scored_upload: ScoredUpload) -> None:
    """The Model page names the version that scored the job, renders its model card and serves its plots only."""
    staff = scored_upload.staff
    model = staff.get("/model")
    assert model.status_code == 200 and scored_upload.summary["model_version"] == "smoke-test"
    assert "smoke-test" in model.text
    assert "<h3" in model.text and "Intended use" in model.text and "<table>" in model.text  # the model card
    assert "Referral rule" in model.text and "Validation split" in model.text
    plot_urls = re.findall(r'<img src="(/model/plots/[^"]+)"', model.text)
    assert sorted(plot_urls) == [f"/model/plots/isic2017_{k}.png" for k in ("confusion", "reliability", "roc")]
    for url in plot_urls:
        plot = staff.get(url)
        assert plot.status_code == 200 and PILImage.open(io.BytesIO(plot.data)).format == "PNG"
    assert staff.get("/model/plots/metadata.json").status_code == 404
    assert staff.get("/model/plots/..%2Fweights_roc.png").status_code == 404


@pytest.mark.services
@pytest.mark.slow
def test_form_without_javascript_and_an_upload_with_nothing_acceptable(scored_upload: ScoredUpload) -> None:
    """The HTML form without JavaScript redirects to the new job's page naming the refused file; an upload with
    nothing acceptable shows why, per file, and makes no job."""
    staff = scored_upload.staff
    first = scored_upload.upload[0]
    plain = staff.upload([first, ("readme.md", b"# not an image")], xhr=False)
    assert plain.status_code == 302 and plain.headers["Location"].startswith("/jobs/")
    followed = staff.get(plain.headers["Location"])
    assert "1 image accepted" in followed.text and "readme.md" in followed.text

    gif = io.BytesIO()
    PILImage.new("RGB", (16, 16)).save(gif, format="GIF")
    nothing = staff.upload([("a.txt", b"text"), ("b.gif", gif.getvalue())], xhr=False)
    assert nothing.status_code == 415 and "a.txt" in nothing.text and "b.gif" in nothing.text
    assert staff.upload([("a.txt", b"text")]).get_json()["details"][0]["filename"] == "a.txt"


@pytest.mark.services
def test_another_clinic_sees_nothing(stack, isic_test_images):
    """A second clinic's user gets 404 for the first clinic's job, its exports, images, thumbnails and heatmaps."""
    from web import create_app
    from worker.gradcam import compute_heatmap

    stack.env["REDIS_URL"] = private_redis(stack)
    settings = stack.settings()
    app = create_app(settings)
    _a, email_a = make_user(settings)
    _b, email_b = make_user(settings)
    owner, stranger = Staff(app, email_a), Staff(app, email_b)

    files, _labels = isic_test_images(3)
    job_id = owner.upload(files).get_json()["job_id"]
    score_in_process(settings, job_id)
    assert owner.wait(job_id, timeout=30)["status"] == "done"
    image_id = table_rows(owner.get(f"/jobs/{job_id}").text)[0]["image-id"]
    assert compute_heatmap(image_id, db_predictions(settings, job_id)[image_id].model_version, settings)
    # A bundle with an ONNX feature output keeps its grid with the prediction ("grid"); an older one has a PNG.
    assert owner.get_json(f"/images/{image_id}/heatmap").get_json()["state"] in ("grid", "ready")

    for url in (f"/jobs/{job_id}", f"/jobs/{job_id}/results.csv", f"/jobs/{job_id}/results.json",
                f"/images/{image_id}", f"/images/{image_id}/file", f"/images/{image_id}/thumb",
                f"/images/{image_id}/heatmap.png"):
        assert owner.get(url).status_code == 200, url
        response = stranger.get(url)
        assert response.status_code == 404, url
        assert image_id not in response.text and "ISIC_" not in response.text
    assert stranger.get_json(f"/jobs/{job_id}/status").status_code == 404
    assert stranger.get_json(f"/images/{image_id}/heatmap").status_code == 404
    assert job_id[:8] not in stranger.get("/jobs").text
    assert job_id[:8] in owner.get("/jobs").text
