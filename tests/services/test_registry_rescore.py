"""Model registry and nightly re-scoring on PostgreSQL, Redis, an S3 server and real Celery worker/beat processes."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from realservices import REDIS_BASE, ROOT
from sqlalchemy import func, select

from skinscan.db import session_scope
from skinscan.tables import AuditEvent, ImageRecord, Job, ModelVersion, Prediction, RescoreRun

pytestmark = [pytest.mark.services]

ISIC_TEST = "ISIC-2017_Test_v2_Data"
N_IMAGES = 24  # images each test stores before re-scoring them
WAIT = 600.0  # seconds any one wait may take (a loaded CI machine; each test's own limit is pytest's --timeout)
ARCH, SIZE = "resnet18", 64  # random ResNet-18s tell images apart (see tests/conftest.py); 64 px keeps them quick


# --- two model bundles of the same architecture with different weights --------------------------------


def _scores(out: Path, images: list[bytes]) -> tuple[list[float], list[float]]:
    """Malignancy scores and top-class probabilities of a saved bundle on the images, as the worker scores them."""
    from skinscan.model.bundle import load_bundle
    from skinscan.model.scorer import Scorer

    scorer = Scorer(load_bundle(out), backend="torch", threads=1, decode_workers=1)
    results = [r.probabilities for r in scorer.score_bytes([(str(i), b) for i, b in enumerate(images)])]
    assert all(results)
    return [scorer.malignancy(p) for p in results], [max(p.values()) for p in results]


def _set_referral(out: Path, threshold: float, uncertain_below: float) -> None:
    """Write referral settings into a bundle's metadata (metadata.json is not among the checksummed files)."""
    from skinscan.model.bundle import METADATA_FILE

    meta = json.loads((out / METADATA_FILE).read_text())
    meta["referral"] = {"malignancy_threshold": threshold, "uncertain_below": uncertain_below}
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _between(values: list[float], rank: int) -> float:
    """A cut between the rank-th and (rank+1)-th smallest value, so exactly `rank` values fall below it."""
    ordered = sorted(values)
    return (ordered[rank - 1] + ordered[rank]) / 2


@pytest.fixture(scope="session")
def two_bundles(tmp_path_factory: pytest.TempPathFactory, isic2017_dir: Path) -> tuple[Path, Path]:
    """Bundles 'rescore-a' (random weights) and 'rescore-b' (A's weights with its head perturbed), whose labels
    and referral flags agree on some of the test images and differ on others, in both directions."""
    import torch

    from skinscan.model.bundle import WEIGHTS_FILE
    from training.export import create_model, save_bundle

    images = [p.read_bytes() for p in sorted((isic2017_dir / ISIC_TEST).glob("ISIC_*.jpg"))[:N_IMAGES]]
    root = tmp_path_factory.mktemp("registry-bundles")
    meta = {"architecture": ARCH, "input_size": SIZE, "resize_size": SIZE + SIZE // 8, "mean": [0.6, 0.5, 0.45],
            "std": [0.2, 0.2, 0.2], "temperature": 1.0}
    torch.manual_seed(11)
    save_bundle(create_model(ARCH, 7), root / "a", {**meta, "version": "rescore-a"}, onnx=False)
    malignancy, _ = _scores(root / "a", images)
    _set_referral(root / "a", _between(malignancy, N_IMAGES // 2), 0.0)  # A flags the top half by malignancy

    state = {k: v.float() if v.is_floating_point() else v
             for k, v in torch.load(root / "a" / WEIGHTS_FILE, weights_only=True).items()}
    noise = torch.Generator().manual_seed(22)
    scale = 0.1 * float(state["fc.weight"].std())
    for name in ("fc.weight", "fc.bias"):
        state[name] = state[name] + scale * torch.randn(state[name].shape, generator=noise)
    model_b = create_model(ARCH, 7)
    model_b.load_state_dict(state)
    save_bundle(model_b, root / "b", {**meta, "version": "rescore-b"}, onnx=False)
    malignancy, confidence = _scores(root / "b", images)
    # B flags its top quarter by malignancy and its least confident quarter.
    _set_referral(root / "b", _between(malignancy, 3 * N_IMAGES // 4), _between(confidence, N_IMAGES // 4))
    return root / "a", root / "b"


# --- an isolated Redis database, the environment of this process, beat --------------------------------------


@pytest.fixture()
def rstack(stack: Any, monkeypatch: pytest.MonkeyPatch, fresh_settings: Callable[[], Any]) -> Iterator[Any]:
    """The stack on a Redis database of its own (db 9 is shared by other test modules), its env in this process."""
    claims = redis.Redis.from_url(f"{REDIS_BASE}/0")
    key = None
    for n in range(10, 16):
        if claims.set(f"skinscan-test:redis-db:{n}", f"{os.getpid()}", nx=True, ex=3600):
            key = f"skinscan-test:redis-db:{n}"
            break
    if key is None:
        pytest.fail("Redis databases 10..15 are all claimed by other test runs")
    url = f"{REDIS_BASE}/{key.rsplit(':', 1)[1]}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    stack.env["REDIS_URL"] = stack.redis_url = url
    for name, value in stack.env.items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
    fresh_settings()  # code run in this process reads this stack's settings
    yield stack
    for w in stack.workers:
        w.stop()
    client.flushdb()
    claims.delete(key)


class Client:
    """A Flask test client for the stack, signed in as one clinic."""

    def __init__(self, settings: Any, name: str) -> None:
        from skinscan.security import create_api_key
        from skinscan.tables import Clinic
        from web import create_app

        self.client = create_app(settings).test_client()
        with session_scope(settings) as session:
            clinic = Clinic(name=f"{name}-{uuid.uuid4().hex[:6]}")
            session.add(clinic)
            session.flush()
            self.clinic_id, self.key = clinic.id, create_api_key(session, clinic)

    def get(self, path: str) -> Any:
        """GET with this clinic's key."""
        return self.client.get(path, headers={"Authorization": f"Bearer {self.key}"})

    def submit(self, files: list[tuple[str, bytes]]) -> dict[str, Any]:
        """POST /api/v1/jobs and return the accepted job."""
        data = {"files": [(io.BytesIO(b), name) for name, b in files]}
        resp = self.client.post("/api/v1/jobs", data=data, headers={"Authorization": f"Bearer {self.key}"},
                                content_type="multipart/form-data")
        assert resp.status_code == 202, resp.get_json()
        return resp.get_json()

    def wait_job(self, job_id: str, timeout: float = WAIT) -> dict[str, Any]:
        """Poll a job until it is done or failed."""
        deadline = time.monotonic() + timeout
        while True:
            body = self.get(f"/api/v1/jobs/{job_id}").get_json()
            if body["status"] in ("done", "failed"):
                return body
            assert time.monotonic() < deadline, f"job {job_id} still {body['status']} after {timeout}s"
            time.sleep(0.3)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.3) -> Any:
    """Poll until predicate returns something truthy; fail with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(interval)


def cli(*argv: str) -> tuple[int, str]:
    """Run `skinscan ARGV` in this process (its environment is the stack's) and return (code, stdout)."""
    from contextlib import redirect_stdout

    from skinscan.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            out.write(str(exc.code))
    return code, out.getvalue()


def isic_files(isic2017_dir: Path, n: int, offset: int = 0) -> list[tuple[str, bytes]]:
    """The first n ISIC 2017 test images after offset, as (name, bytes)."""
    paths = sorted((isic2017_dir / ISIC_TEST).glob("ISIC_*.jpg"))[offset:offset + n]
    return [(p.name, p.read_bytes()) for p in paths]


def predictions_by_image(settings: Any, image_ids: list[str]) -> dict[str, dict[str, Prediction]]:
    """{image id: {model version: prediction}} for these images."""
    out: dict[str, dict[str, Prediction]] = {i: {} for i in image_ids}
    with session_scope(settings) as session:
        for p in session.scalars(select(Prediction).where(Prediction.image_id.in_(image_ids))):
            out[p.image_id][p.model_version] = p
    return out


def job_image_ids(settings: Any, job_id: str) -> list[str]:
    """A job's image ids in upload order."""
    with session_scope(settings) as session:
        return list(session.scalars(select(ImageRecord.id).where(ImageRecord.job_id == job_id)
            .order_by(ImageRecord.position)))


def get_run(settings: Any, run_id: int) -> RescoreRun:
    """A fresh read of a run."""
    with session_scope(settings) as session:
        run = session.get(RescoreRun, run_id)
        assert run is not None
        return run


def register_and_promote_a(two_bundles: tuple[Path, Path]) -> None:
    """Through the CLI: register both bundles, put A in production (B stays registered only)."""
    for bundle in two_bundles:
        code, out = cli("models", "register", str(bundle))
        assert code == 0 and "registered rescore-" in out, out
    code, out = cli("models", "promote", "rescore-a")
    assert code == 0, out


class Beat:
    """`skinscan beat` in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "skinscan.cli", "beat"], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)

    def stop(self) -> None:
        """Stop beat and its children."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def start_beat_before_its_minute(stack: Any) -> Beat:
    """Start beat with the nightly re-score set to a coming minute; start again later if beat was up too late."""
    margin = 40
    for attempt in range(4):
        at = datetime.now(UTC) + timedelta(seconds=margin)
        at = (at.replace(second=0, microsecond=0) + timedelta(minutes=1)) if at.second else at
        env = {**stack.env, "SKINSCAN_RESCORE_ENABLED": "true", "SKINSCAN_RESCORE_HOUR": str(at.hour),
               "SKINSCAN_RESCORE_MINUTE": str(at.minute)}
        beat = Beat(env, stack.tmp / f"beat{attempt}.log")
        wait_for(lambda b=beat: "Starting..." in b.log_path.read_text(errors="replace") or b.proc.poll() is not None,
                 WAIT, "beat to start")
        assert beat.proc.poll() is None, beat.log_path.read_text(errors="replace")[-3000:]
        if datetime.now(UTC) < at - timedelta(seconds=5):
            return beat
        beat.stop()
        margin *= 2
    raise AssertionError("beat never started ahead of its scheduled minute")


# --- tests ----------------------------------------------------------------------------------------------------


def test_schedule_is_on_by_default_configurable_and_routed_to_the_rescore_queue(monkeypatch, fresh_settings):
    """The beat schedule names the nightly re-score at 02:00 UTC by default, moves with settings, can be off."""
    from celery.schedules import crontab

    from skinscan.broker import create_celery
    from worker.tasks import nightly_rescore, rescore_chunk

    for name in ("SKINSCAN_RESCORE_ENABLED", "SKINSCAN_RESCORE_HOUR", "SKINSCAN_RESCORE_MINUTE"):
        monkeypatch.delenv(name, raising=False)
    entry = create_celery(fresh_settings()).conf.beat_schedule["nightly-rescore"]
    assert entry["task"] == "worker.tasks.nightly_rescore" and entry["schedule"] == crontab(hour=2, minute=0)
    monkeypatch.setenv("SKINSCAN_RESCORE_HOUR", "23")
    monkeypatch.setenv("SKINSCAN_RESCORE_MINUTE", "45")
    entry = create_celery(fresh_settings()).conf.beat_schedule["nightly-rescore"]
    assert entry["schedule"] == crontab(hour=23, minute=45)
    monkeypatch.setenv("SKINSCAN_RESCORE_ENABLED", "false")
    assert "nightly-rescore" not in create_celery(fresh_settings()).conf.beat_schedule
    assert nightly_rescore.queue == rescore_chunk.queue == "rescore"


def test_register_refuses_broken_bundles_and_audits_model_changes(rstack, two_bundles, tmp_path):
    """Register checks metadata, checksums and that the bundle scores; promote/rollback are audited."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(two_bundles[0], bad)
    with (bad / "weights.pt").open("ab") as fh:
        fh.write(b"tampered")
    code, out = cli("models", "register", str(bad))
    assert code != 0 and "checksum" in out
    meta = json.loads((two_bundles[0] / "metadata.json").read_text())
    wrong = tmp_path / "wrong-classes"
    shutil.copytree(two_bundles[0], wrong)
    (wrong / "metadata.json").write_text(json.dumps({**meta, "classes": ["a", "b", "c", "d", "e", "f", "g"],
                                                     "version": "wrong-classes"}))
    code, out = cli("models", "register", str(wrong))
    assert code != 0 and "classes" in out
    code, out = cli("models", "register", str(tmp_path))
    assert code != 0 and "metadata.json" in out
    code, out = cli("models", "rollback")
    assert code != 0 and "nothing to roll back" in out

    register_and_promote_a(two_bundles)
    code, out = cli("models", "register", str(two_bundles[1]))  # again: a no-op, still not promoted
    assert code == 0
    code, out = cli("models", "list", "--json")
    listed = {m["version"]: m["status"] for m in json.loads(out)}
    assert listed == {"rescore-a": "production", "rescore-b": "registered"}
    code, out = cli("models", "promote", "rescore-a")
    assert code != 0 and "already" in out
    code, out = cli("models", "promote", "no-such-model")
    assert code != 0 and "not registered" in out
    assert cli("models", "promote", "rescore-b")[0] == 0
    code, out = cli("models", "rollback")
    assert code == 0 and "rescore-a is in production" in out
    code, out = cli("models", "rollback")
    assert code != 0 and "nothing to roll back" in out

    settings = rstack.settings()
    with session_scope(settings) as session:
        statuses = dict(session.execute(select(ModelVersion.version, ModelVersion.status)).all())
        events = [(e.action, e.target_id, (e.details or {}).get("from"))
                  for e in session.scalars(select(AuditEvent).where(AuditEvent.action.like("model.%"))
                                           .order_by(AuditEvent.id))]
    assert statuses == {"rescore-a": "production", "rescore-b": "retired"}
    assert events == [("model.register", "rescore-a", None), ("model.register", "rescore-b", None),
                      ("model.promote", "rescore-a", None), ("model.promote", "rescore-b", "rescore-a"),
                      ("model.rollback", "rescore-a", "rescore-b")]
    # The database itself refuses a second production model.
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), session_scope(settings) as session:
        session.get(ModelVersion, "rescore-b").status = "production"


def test_nightly_rescore_through_beat_and_worker(rstack, two_bundles, isic2017_dir):
    """Promote a second model; beat's nightly task re-scores every image through a worker, keeping the old results;
    the change report lists exactly the changed images; a second run adds nothing; rollback serves the old model."""
    settings = rstack.settings()
    register_and_promote_a(two_bundles)
    clinic, other = Client(rstack.settings(), "clinic"), Client(rstack.settings(), "other")
    rstack.worker()
    job = clinic.submit(isic_files(isic2017_dir, N_IMAGES))
    first = clinic.wait_job(job["id"])
    assert first["status"] == "done" and first["model_version"] == "rescore-a"
    ids = job_image_ids(settings, job["id"])
    before = predictions_by_image(settings, ids)
    assert all(set(p) == {"rescore-a"} for p in before.values())

    assert cli("models", "promote", "rescore-b")[0] == 0
    models = clinic.get("/api/v1/models").get_json()
    assert models["production"] == "rescore-b" and {m["version"] for m in models["models"]} == {"rescore-a",
                                                                                                "rescore-b"}
    assert all("path" not in m for m in models["models"])

    # Beat fires the nightly re-score at the configured minute (set far enough ahead that beat is up by then).
    beat = start_beat_before_its_minute(rstack)
    try:
        def finished_run() -> RescoreRun | None:
            with session_scope(settings) as session:
                return session.scalars(select(RescoreRun).where(RescoreRun.status == "done")).first()

        run = wait_for(finished_run, WAIT + 120, "the nightly re-score run to finish", interval=2)
    finally:
        beat.stop()
    assert (run.model_from, run.model_to, run.actor) == ("rescore-a", "rescore-b", "schedule")
    assert (run.total, run.done, run.failed) == (N_IMAGES, N_IMAGES, 0)
    assert run.duration_s is not None and run.duration_s > 0 and run.finished_at is not None

    after = predictions_by_image(settings, ids)
    for image_id in ids:
        assert set(after[image_id]) == {"rescore-a", "rescore-b"}
        old, kept = before[image_id]["rescore-a"], after[image_id]["rescore-a"]
        assert (kept.id, kept.probabilities, kept.label, kept.flagged) == (old.id, old.probabilities, old.label,
                                                                           old.flagged)
    with session_scope(settings) as session:
        assert set(session.scalars(select(ImageRecord.status).where(ImageRecord.job_id == job["id"]))) == {"scored"}
        upload = session.get(Job, job["id"])
        assert (upload.status, upload.scored, upload.model_version) == ("done", N_IMAGES, "rescore-a")

    # The change report, computed here independently from the predictions table.
    def changed(p: dict[str, Prediction]) -> bool:
        return p["rescore-a"].label != p["rescore-b"].label or p["rescore-a"].flagged != p["rescore-b"].flagged

    expected = {i for i in ids if changed(after[i])}
    newly = {i for i in expected if after[i]["rescore-b"].flagged and not after[i]["rescore-a"].flagged}
    unflagged = {i for i in expected if after[i]["rescore-a"].flagged and not after[i]["rescore-b"].flagged}
    assert 0 < len(expected) < N_IMAGES and newly and unflagged, "the two test models should disagree on some"
    assert (run.changed, run.flagged) == (len(expected), len(newly))

    report = clinic.get(f"/api/v1/changes?run={run.id}").get_json()
    rows = report["changes"]
    assert [r["image_id"] for r in rows if r["image_id"] in expected] == [r["image_id"] for r in rows]
    assert {r["image_id"] for r in rows} == expected and len(rows) == len(expected)
    assert {r["image_id"] for r in rows if r["change"] == "newly_flagged"} == newly
    assert [r["change"] == "newly_flagged" for r in rows] == sorted((r["change"] == "newly_flagged" for r in rows),
                                                                    reverse=True)
    for r in rows:
        old, new = after[r["image_id"]]["rescore-a"], after[r["image_id"]]["rescore-b"]
        assert (r["previous_model"], r["previous_label"]) == ("rescore-a", old.label)
        assert r["previous_flagged"] == old.flagged
        assert (r["new_model"], r["new_label"], r["new_flagged"]) == ("rescore-b", new.label, new.flagged)
        assert r["previous_malignancy"] == pytest.approx(old.malignancy)
        assert r["new_malignancy"] == pytest.approx(new.malignancy)
    assert report["run"]["images"] == N_IMAGES and report["run"]["changed"] == len(expected)
    assert clinic.get("/api/v1/changes").get_json()["changes"] == rows  # default: the newest finished run
    resp = clinic.get(f"/api/v1/changes?run={run.id}&format=csv")
    assert resp.status_code == 200 and resp.mimetype == "text/csv"
    csv_rows = list(csv.DictReader(io.StringIO(resp.get_data(as_text=True))))
    assert [r["image_id"] for r in csv_rows] == [r["image_id"] for r in rows]
    assert [r["change"] for r in csv_rows] == [r["change"] for r in rows]

    runs = clinic.get("/api/v1/rescore-runs").get_json()["runs"]
    assert [(r["id"], r["status"], r["images"], r["done"], r["progress"]) for r in runs] == [
        (run.id, "done", N_IMAGES, N_IMAGES, 1.0)]
    # Another clinic sees the run (it covered every clinic) but none of this clinic's images or changes.
    theirs = other.get(f"/api/v1/changes?run={run.id}").get_json()
    assert theirs["changes"] == [] and theirs["run"]["images"] == 0
    assert other.get("/api/v1/changes?run=999999").status_code == 404

    # Results show the current model's prediction and the history of every model's.
    results = clinic.get(f"/api/v1/jobs/{job['id']}/results?history=true").get_json()["results"]
    for r in results:
        assert r["model_version"] == "rescore-b"
        assert r["predicted_label"] == after[r["image_id"]]["rescore-b"].label
        assert [h["model_version"] for h in r["history"]] == ["rescore-a", "rescore-b"]

    # Run it again: nothing is left to do, no prediction and no run are added.
    from worker.tasks import nightly_rescore

    assert nightly_rescore.run() is None
    code, out = cli("rescore")
    assert code == 0 and "nothing to re-score" in out
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 2 * N_IMAGES
        assert session.scalar(select(func.count()).select_from(RescoreRun)) == 1

    # Rollback: the earlier model serves new jobs again.
    code, out = cli("models", "rollback")
    assert code == 0 and "rescore-a is in production" in out
    again = clinic.submit(isic_files(isic2017_dir, 2, offset=N_IMAGES))
    assert clinic.wait_job(again["id"])["model_version"] == "rescore-a"
    new_ids = job_image_ids(settings, again["id"])
    assert all(set(p) == {"rescore-a"} for p in predictions_by_image(settings, new_ids).values())
    assert clinic.get("/api/v1/models").get_json()["production"] == "rescore-a"


def _start_rescore_of_stored_images(rstack: Any, two_bundles: tuple[Path, Path], isic2017_dir: Path,
                                    clinic: Client) -> list[str]:
    """Store N_IMAGES images scored by model A, then promote B (the worker keeps running)."""
    settings = rstack.settings()
    register_and_promote_a(two_bundles)
    rstack.worker()
    job = clinic.submit(isic_files(isic2017_dir, N_IMAGES))
    assert clinic.wait_job(job["id"])["status"] == "done"
    assert cli("models", "promote", "rescore-b")[0] == 0
    return job_image_ids(settings, job["id"])


def _count_b(settings: Any, ids: list[str], before: datetime | None = None) -> int:
    with session_scope(settings) as session:
        query = select(func.count()).select_from(Prediction).where(
            Prediction.image_id.in_(ids), Prediction.model_version == "rescore-b")
        if before is not None:
            query = query.where(Prediction.created_at < before)
        return session.scalar(query) or 0


def test_killed_worker_and_rerun_give_exactly_one_prediction_per_image(rstack, two_bundles, isic2017_dir):
    """SIGKILL the worker in the middle of a re-score, run the re-score again and restart the worker: every image
    ends with exactly one prediction of the new model, counted once, in the same run."""
    from worker.rescore import start_rescore

    settings = rstack.settings()
    clinic = Client(rstack.settings(), "clinic")
    ids = _start_rescore_of_stored_images(rstack, two_bundles, isic2017_dir, clinic)
    run = start_rescore(settings, actor="test", chunk_size=1)
    assert run is not None and run.total == N_IMAGES
    wait_for(lambda: _count_b(settings, ids) >= 3, WAIT, "a few re-scored images", interval=0.05)
    rstack.workers[-1].kill()
    done_at_kill = _count_b(settings, ids)
    assert done_at_kill < N_IMAGES, "the run finished before the worker was killed; the test proves nothing"

    rerun = start_rescore(settings, actor="test", chunk_size=1)  # resumes the same run and sends what is left
    assert rerun is not None and rerun.id == run.id
    rstack.worker()
    final = wait_for(lambda: (r := get_run(settings, run.id)).status == "done" and r, WAIT, "the run to finish")
    # Let every duplicate message (the killed delivery comes back after the visibility timeout) be consumed too.
    client = redis.Redis.from_url(rstack.redis_url)
    wait_for(lambda: client.llen("rescore") == 0 and client.hlen("unacked") == 0, WAIT,
             "the rescore queue and unacked messages to drain", interval=1)
    time.sleep(2)
    after = predictions_by_image(settings, ids)
    assert all(sorted(p) == ["rescore-a", "rescore-b"] for p in after.values())
    with session_scope(settings) as session:
        per_image = session.execute(select(Prediction.image_id, func.count()).where(
            Prediction.model_version == "rescore-b").group_by(Prediction.image_id)).all()
        assert session.scalar(select(func.count()).select_from(RescoreRun)) == 1
    assert sorted(n for _, n in per_image) == [1] * N_IMAGES
    final = get_run(settings, run.id)
    assert (final.status, final.total, final.done, final.failed) == ("done", N_IMAGES, N_IMAGES, 0)


def test_clinic_upload_during_a_rescore_finishes_before_its_remaining_chunks(rstack, two_bundles, isic2017_dir):
    """With one worker process, an upload sent while a re-score is queued is scored before the re-score's
    remaining chunks: the clinic queue is always polled first."""
    from worker.rescore import start_rescore

    settings = rstack.settings()
    clinic = Client(rstack.settings(), "clinic")
    ids = _start_rescore_of_stored_images(rstack, two_bundles, isic2017_dir, clinic)
    run = start_rescore(settings, actor="test", chunk_size=1)
    assert run is not None and run.total == N_IMAGES
    wait_for(lambda: _count_b(settings, ids) >= 2, WAIT, "the re-score to start", interval=0.05)
    upload = clinic.submit(isic_files(isic2017_dir, 3, offset=N_IMAGES))
    sent = datetime.now(UTC)
    assert clinic.wait_job(upload["id"])["status"] == "done"
    with session_scope(settings) as session:
        finished = session.get(Job, upload["id"]).finished_at
    wait_for(lambda: get_run(settings, run.id).status == "done", WAIT, "the re-score to finish")
    # Before the upload finished, at most the one re-score chunk that was running when it came was completed
    # after it was sent; the re-score's other chunks all waited for it.
    assert _count_b(settings, ids, finished) - _count_b(settings, ids, sent) <= 1
    assert N_IMAGES - _count_b(settings, ids, finished) >= 1
    assert _count_b(settings, ids) == N_IMAGES


def test_migration_0002_down_and_up_on_postgres(rstack):
    """0002 adds rescore_runs and the one-production index; downgrade to 0001 removes them, upgrade restores."""
    from sqlalchemy import inspect

    from skinscan.db import get_engine
    from skinscan.migrate import downgrade, upgrade

    settings = rstack.settings()

    def shape() -> tuple[bool, bool]:
        insp = inspect(get_engine(settings))
        indexes = {i["name"] for i in insp.get_indexes("model_versions")}
        return "rescore_runs" in insp.get_table_names(), "uq_model_versions_one_production" in indexes

    assert shape() == (True, True)
    downgrade(settings, "0001")
    assert shape() == (False, False)
    upgrade(settings)
    assert shape() == (True, True)


def test_rescore_by_hand_on_the_embedded_database(tmp_path, two_bundles, isic2017_dir, monkeypatch, fresh_settings):
    """Without Redis, `skinscan rescore` scores in its own process on SQLite; the report and counts still hold."""
    from skinscan.settings import load_settings
    from worker.pipeline import score_chunk

    for name in ("DATABASE_URL", "REDIS_URL", "S3_BUCKET", "S3_ENDPOINT_URL", "SKINSCAN_ENV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SKINSCAN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SKINSCAN_MODEL", str(two_bundles[0]))
    fresh_settings()
    register_and_promote_a(two_bundles)
    settings = load_settings()
    assert settings.embedded and settings.database_url.startswith("sqlite")

    clinic = Client(settings, "embedded")
    job = clinic.submit(isic_files(isic2017_dir, 8))  # enqueued on the in-process broker, which nobody serves here
    ids = job_image_ids(settings, job["id"])
    assert score_chunk(job["id"], ids, settings) == 8
    assert cli("models", "promote", "rescore-b")[0] == 0
    code, out = cli("rescore", "--since", "2000-01-01")
    assert code == 0 and "run 1 done: rescore-a -> rescore-b, 8/8 images re-scored" in out, out
    after = predictions_by_image(settings, ids)
    expected = {i for i, p in after.items()
                if (p["rescore-a"].label, p["rescore-a"].flagged) != (p["rescore-b"].label, p["rescore-b"].flagged)}
    rows = clinic.get("/api/v1/changes").get_json()["changes"]
    assert {r["image_id"] for r in rows} == expected and len(rows) == len(expected)
    runs = clinic.get("/api/v1/rescore-runs").get_json()["runs"]
    assert [(r["images"], r["done"], r["changed"]) for r in runs] == [(8, 8, len(expected))]
    code, out = cli("rescore")
    assert code == 0 and "nothing to re-score" in out
    code, out = cli("rescore", "--list")
    assert code == 0 and out.startswith("run 1 done")
