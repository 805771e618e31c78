"""Scale benchmark: per-item costs of re-score bookkeeping and the hot API reads at 100,000 and 1,000,000 images.

For each size a throwaway PostgreSQL database is created on 127.0.0.1:5432 (SKINSCAN_TEST_PG, as for the tests),
migrated with the real migrations (skinscan.migrate) and filled in bulk (generate_series) with that many images
across 50 clinics, jobs of 1,000 images, a prediction of model `scale-a` per image and an audit trail of one row per
image; `scale-b` is in production. Then it measures, on the real code and tables:

- enqueue: the nightly re-score's start (`start_rescore`): keyset pages, chunk records, counters, and the messages
  sent to Redis (a database of 127.0.0.1:6379 claimed as the tests claim theirs, 10..15, flushed before and after;
  no worker consumes it), per image;
- bookkeeping: one chunk through `rescore_chunk` (its images read, predictions written, counts and change lines
  kept), per chunk, over a sample of chunks. THE MODEL IS REPLACED BY A CONSTANT-TIME SCORER in this benchmark only
  (a label and score derived from the image id), so what is timed is the bookkeeping, not the network;
- the change report's first page (`GET /api/v1/changes?limit=100`), the status poll (`GET /api/v1/jobs/<id>`) and a
  results page (`GET /api/v1/jobs/<id>/results?limit=100`, which writes its audit row), p50/p99, through the Flask
  app (test client: no HTTP server) on the same database. The objects built during setup are frozen out of the
  garbage collector (gc.freeze) before each timed step, so a collection of them is not counted as a request.

The run's other chunks are completed in bulk by SQL before the reads (the same rows the bookkeeping writes). Every
query of each step is EXPLAINed (ANALYZE for reads) into var/benchmarks/scale-explain-<size>.txt (printed with
--explain). The table gives each per-item cost at both sizes and their ratio (flat: within 1.5x). The database is
dropped at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests" / "helpers"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

log = logging.getLogger("benchmarks.scale")

CLINICS = 50
JOB_SIZE = 1000
GEN_BATCH = 100_000
OLD, NEW = "scale-a", "scale-b"
BIG_TABLES = ("images", "predictions", "audit_events", "rescore_changes", "rescore_chunks", "jobs", "job_chunks")
FLAT = 1.5


class ConstantScorer:
    """Stands in for the model in this benchmark only: a label and a malignancy score derived from the image id."""

    version = NEW

    def __init__(self) -> None:
        from skinscan.labels import CLASSES

        self.classes = list(CLASSES)

    def probabilities(self, image_id: str) -> dict[str, float]:
        """Class probabilities for an image, from its id (constant time)."""
        top = int(image_id[:2], 16) % len(self.classes)
        rest = 0.3 / (len(self.classes) - 1)
        return {c: 0.7 if n == top else rest for n, c in enumerate(self.classes)}

    def score_stored(self, storage: Any, items: list[tuple[str, str]]) -> list[Any]:
        """Score stored images without reading them."""
        from skinscan.model.scorer import Scored

        return [Scored(image_id, probabilities=self.probabilities(image_id)) for image_id, _ in items]

    def malignancy(self, probabilities: dict[str, float]) -> float:
        """The malignant classes' probability."""
        return sum(probabilities.get(c, 0.0) for c in ("mel", "bcc", "akiec"))

    def flagged(self, probabilities: dict[str, float]) -> bool:
        """Referral flag at 0.5."""
        return self.malignancy(probabilities) >= 0.5


@contextmanager
def progress(what: str) -> Iterator[None]:
    """Log a step's start and how long it took."""
    start = time.perf_counter()
    log.info("%s ...", what)
    yield
    log.info("%s: %.1f s", what, time.perf_counter() - start)


def generate(settings: Any, n: int) -> dict[str, Any]:
    """Fill the migrated database: clinics, jobs, n images with a prediction each, an audit trail; scale-b in
    production. Returns the clinic, key and job ids the reads use."""
    from sqlalchemy import text

    from skinscan.db import get_engine, session_scope
    from skinscan.security import create_api_key
    from skinscan.tables import AuditEvent, Clinic, ModelVersion

    engine = get_engine(settings)
    jobs = max(1, n // JOB_SIZE)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO clinics (id, name, created_at) SELECT lpad(to_hex(c), 32, '0'), "
                          "'scale-clinic-' || c, now() FROM generate_series(0, :c - 1) c"), {"c": CLINICS})
        conn.execute(text(
            "INSERT INTO jobs (id, clinic_id, kind, status, model_version, total, scored, failed, created_at, "
            "started_at, finished_at, updated_at) SELECT 'j' || lpad(to_hex(j), 31, '0'), "
            "lpad(to_hex(j % :c), 32, '0'), 'upload', 'done', :old, :size, :size, 0, "
            "timestamptz '2026-01-01' + j * interval '1 minute', timestamptz '2026-01-01' + j * interval '1 minute', "
            "timestamptz '2026-01-01' + j * interval '1 minute', timestamptz '2026-01-01' + j * interval '1 minute' "
            "FROM generate_series(0, :jobs - 1) j"), {"c": CLINICS, "old": OLD, "size": JOB_SIZE, "jobs": jobs})
    labels = "(ARRAY['akiec','bcc','bkl','df','mel','nv','vasc'])"
    start = time.perf_counter()
    for lo in range(0, n, GEN_BATCH):
        hi = min(n, lo + GEN_BATCH)
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO images (id, job_id, clinic_id, position, filename, storage_key, sha256, size, "
                "content_type, status, attempts, created_at) SELECT md5('img' || i), "
                "'j' || lpad(to_hex(i / :size), 31, '0'), lpad(to_hex((i / :size) % :c), 32, '0'), i % :size, "
                "'ISIC_' || lpad(i::text, 7, '0') || '.jpg', 'scale/' || md5('img' || i), md5('sha' || i), 200000, "
                "'image/jpeg', 'scored', 1, timestamptz '2026-01-01' + i * interval '60 milliseconds' "
                "FROM generate_series(:lo, :hi - 1) i"), {"size": JOB_SIZE, "c": CLINICS, "lo": lo, "hi": hi})
            conn.execute(text(
                "INSERT INTO predictions (image_id, model_version, probabilities, label, confidence, malignancy, "
                f"flagged, created_at) SELECT md5('img' || i), :old, '{{}}'::json, {labels}[1 + i % 7], 0.7, "
                "((i::bigint * 7919) % 1000) / 1000.0, ((i::bigint * 7919) % 1000) >= 700, "
                "timestamptz '2026-01-01' + i * interval '60 milliseconds' + interval '1 minute' "
                "FROM generate_series(:lo, :hi - 1) i"), {"old": OLD, "lo": lo, "hi": hi})
            conn.execute(text(
                "INSERT INTO audit_events (at, clinic_id, actor, action, target_type, target_id, details) "
                "SELECT timestamptz '2026-01-01' + i * interval '60 milliseconds', "
                "lpad(to_hex((i / :size) % :c), 32, '0'), 'api-key:scale', "
                "CASE WHEN i % 3 = 0 THEN 'job.view_results' WHEN i % 3 = 1 THEN 'job.view_metrics' "
                "ELSE 'job.create' END, 'job', 'j' || lpad(to_hex(i / :size), 31, '0'), NULL "
                "FROM generate_series(:lo, :hi - 1) i"), {"size": JOB_SIZE, "c": CLINICS, "lo": lo, "hi": hi})
        done = hi
        rate = done / max(1e-9, time.perf_counter() - start)
        log.info("generating: %s / %s images (%3.0f%%), %.0f images/s", f"{done:,}", f"{n:,}", 100 * done / n, rate)
    with session_scope(settings) as session:
        for version, status in ((OLD, "retired"), (NEW, "production")):
            session.add(ModelVersion(version=version, architecture="constant", path="/nonexistent",
                                     checksum="0" * 64, meta={}, status=status, registered_at=datetime.now(UTC)))
        session.add(AuditEvent(action="model.promote", actor="benchmark", target_type="model", target_id=NEW,
                               details={"from": OLD}))
        clinic = session.get(Clinic, f"{0:032x}")
        assert clinic is not None
        key = create_api_key(session, clinic)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    job_ids = [f"j{j:031x}" for j in range(0, jobs, CLINICS)]
    return {"clinic_id": clinic.id, "key": key, "jobs": job_ids}


def complete_rest(settings: Any, run_id: int) -> None:
    """Complete the run's chunks the sample did not, in bulk SQL: the rows the bookkeeping would write."""
    from sqlalchemy import text

    from skinscan.db import get_engine

    labels = "(ARRAY['akiec','bcc','bkl','df','mel','nv','vasc'])"  # skinscan.labels.CLASSES, in order
    top = "(('x' || substr(e.id, 1, 2))::bit(8)::int % 7)"
    with get_engine(settings).begin() as conn:
        conn.execute(text(
            "INSERT INTO predictions (image_id, model_version, probabilities, label, confidence, malignancy, flagged, "
            f"created_at) SELECT e.id, :new, '{{}}'::json, {labels}[1 + {top}], 0.7, "
            f"CASE WHEN {top} IN (0, 1, 4) THEN 0.75 ELSE 0.15 END, {top} IN (0, 1, 4), now() "
            "FROM rescore_chunks c CROSS JOIN LATERAL json_array_elements_text(c.image_ids) AS e(id) "
            "WHERE c.run_id = :run AND c.completed_at IS NULL ON CONFLICT DO NOTHING"), {"new": NEW, "run": run_id})
    with get_engine(settings).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE predictions, rescore_chunks"))  # plan the joins below with the new rows counted
    with get_engine(settings).begin() as conn:
        conn.execute(text(
            "INSERT INTO rescore_changes (run_id, image_id, clinic_id, change, rank, order_key, previous_model, "
            "previous_label, previous_malignancy, previous_flagged, new_model, new_label, new_malignancy, "
            "new_flagged) SELECT :run, i.id, i.clinic_id, CASE WHEN n.flagged AND NOT o.flagged THEN 'newly_flagged' "
            "WHEN o.flagged AND NOT n.flagged THEN 'no_longer_flagged' ELSE 'label_changed' END, "
            "CASE WHEN n.flagged AND NOT o.flagged THEN 0 ELSE 1 END, -n.malignancy, o.model_version, o.label, "
            "o.malignancy, o.flagged, n.model_version, n.label, n.malignancy, n.flagged "
            "FROM rescore_chunks c CROSS JOIN LATERAL json_array_elements_text(c.image_ids) AS e(id) "
            "JOIN images i ON i.id = e.id JOIN predictions n ON n.image_id = i.id AND n.model_version = :new "
            "JOIN predictions o ON o.image_id = i.id AND o.model_version = :old "
            "WHERE c.run_id = :run AND c.completed_at IS NULL AND (o.label <> n.label OR o.flagged <> n.flagged) "
            "ON CONFLICT DO NOTHING"), {"run": run_id, "new": NEW, "old": OLD})
        conn.execute(text("UPDATE rescore_chunks SET completed_at = now(), done = size "
                          "WHERE run_id = :run AND completed_at IS NULL"), {"run": run_id})
        conn.execute(text(
            "UPDATE rescore_run_clinics rc SET done = rc.total, "
            "changed = (SELECT count(*) FROM rescore_changes x WHERE x.run_id = rc.run_id "
            "AND x.clinic_id = rc.clinic_id), "
            "flagged = (SELECT count(*) FROM rescore_changes x WHERE x.run_id = rc.run_id "
            "AND x.clinic_id = rc.clinic_id AND x.rank = 0) WHERE rc.run_id = :run"), {"run": run_id})
        conn.execute(text(
            "UPDATE rescore_runs SET done = total, status = 'done', finished_at = now(), "
            "changed = (SELECT count(*) FROM rescore_changes WHERE run_id = :run), "
            "flagged = (SELECT count(*) FROM rescore_changes WHERE run_id = :run AND rank = 0) WHERE id = :run"),
            {"run": run_id})
    with get_engine(settings).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))


class Recorder:
    """Collects the SQL statements an engine runs while recording is on (for EXPLAIN)."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.on = False
        self.statements: list[tuple[str, Any]] = []
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if self.on and not many:
            self.statements.append((statement, parameters))

    @contextmanager
    def record(self) -> Iterator[list[tuple[str, Any]]]:
        """Record the statements run inside the block."""
        self.statements, self.on = [], True
        try:
            yield self.statements
        finally:
            self.on = False


def _rows(settings: Any, table: str) -> float:
    """The planner's estimate of a table's rows (a sequential scan of a small table is the right plan)."""
    from sqlalchemy import text

    from skinscan.db import get_engine

    with get_engine(settings).connect() as conn:
        found = conn.execute(text("SELECT reltuples FROM pg_class WHERE relname = :t"), {"t": table}).scalar()
    return float(found or 0)


def explain(settings: Any, step: str, statements: list[tuple[str, Any]]) -> tuple[str, list[str]]:
    """EXPLAIN each distinct statement (ANALYZE for reads, inside a rolled-back transaction); return the text and
    warnings for sequential scans of a big table."""
    from skinscan.db import get_engine

    out, warnings, seen = [f"=== {step} ==="], [], set()
    for statement, params in statements:
        head = statement.lstrip().split(None, 1)[0].upper()
        if head not in ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH") or statement in seen:
            continue
        if "pg_advisory" in statement:
            continue
        seen.add(statement)
        analyze = "ANALYZE, BUFFERS, " if head in ("SELECT", "WITH") and "FOR UPDATE" not in statement else ""
        conn = get_engine(settings).raw_connection()
        try:
            cur = conn.cursor()
            cur.execute(f"EXPLAIN ({analyze}COSTS) {statement}", params)
            plan = "\n".join(r[0] for r in cur.fetchall())
        finally:
            conn.rollback()
            conn.close()
        out += ["", " ".join(statement.split())[:600], plan]
        for table in BIG_TABLES:
            if f"Seq Scan on {table} " in plan + " " and _rows(settings, table) > 10_000:
                warnings.append(f"{step}: Seq Scan on {table}")
    return "\n".join(out), warnings


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def timed_requests(client: Any, headers: dict[str, str], paths: Callable[[int], str], n: int) -> list[float]:
    """Milliseconds of n GETs (after 10 warm-up requests); every answer must be 200."""
    gc.collect()
    gc.freeze()  # the long-lived objects of setup are not what is timed: keep them out of every collection
    out = []
    for i in range(n + 10):
        start = time.perf_counter()
        resp = client.get(paths(i), headers=headers)
        took = (time.perf_counter() - start) * 1000
        if resp.status_code != 200:
            raise RuntimeError(f"GET {paths(i)} answered {resp.status_code}: {resp.get_data(as_text=True)[:300]}")
        if i >= 10:
            out.append(took)
    return out


@contextmanager
def redis_database() -> Iterator[str]:
    """Claim a free Redis database (10..15, as the tests do) for the run's messages; flush and release it after."""
    import redis

    base = os.environ.get("SKINSCAN_TEST_REDIS", "redis://127.0.0.1:6379")
    claims = redis.Redis.from_url(f"{base}/0", socket_connect_timeout=3)
    key = next((f"skinscan-test:redis-db:{n}" for n in range(10, 16)
                if claims.set(f"skinscan-test:redis-db:{n}", f"scale-{os.getpid()}", nx=True, ex=3600)), None)
    if key is None:
        raise RuntimeError("Redis databases 10..15 are all claimed by test runs; try again when they finish")
    url = f"{base}/{key.rsplit(':', 1)[1]}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        claims.delete(key)


def run_size(n: int, args: argparse.Namespace, out_dir: Path, redis_url: str) -> dict[str, Any]:
    """Build a database of n images, measure every step, drop it; return the figures."""
    from realservices import PostgresDatabase
    from sqlalchemy import select

    import worker.rescore as rescore
    from skinscan.db import dispose_engines, get_engine, session_scope
    from skinscan.migrate import upgrade
    from skinscan.rescore_runs import Scope, scope_page
    from skinscan.settings import load_settings
    from skinscan.tables import ImageRecord, RescoreChunk, RescoreRun

    db = PostgresDatabase()
    tmp = Path(tempfile.mkdtemp(prefix="skinscan-scale-"))
    try:
        for name in ("REDIS_URL", "S3_BUCKET", "SKINSCAN_ENV"):
            os.environ.pop(name, None)
        load_settings.cache_clear()  # the environment changed just above
        settings = load_settings().model_copy(update=dict(database_url=db.url, data_dir=tmp, redis_url=redis_url,
                                                          s3_bucket=None, rate_limit_per_minute=0,
                                                          chunk_size=args.chunk))
        with progress(f"{n:,} images: migrations"):
            upgrade(settings)
        with progress(f"{n:,} images: generating {n:,} images, predictions and audit rows"):
            ids = generate(settings, n)
        recorder = Recorder(get_engine(settings))
        explains, warnings = [], []

        scorer = ConstantScorer()
        rescore.local_bundle = lambda ref, settings: Path("/constant-scorer")  # type: ignore[assignment]
        rescore.get_scorer = lambda *a, **k: scorer  # type: ignore[assignment]
        gc.collect()
        gc.freeze()
        with progress(f"{n:,} images: nightly re-score enqueue"):
            start = time.perf_counter()
            run = rescore.start_rescore(settings, actor="benchmark", chunk_size=args.chunk, requeue_active=False)
            enqueue_s = time.perf_counter() - start
        assert run is not None and run.total == n, (run and run.total, n)
        with session_scope(settings) as session:
            run_row = session.get(RescoreRun, run.id)
            middle = session.execute(select(ImageRecord.created_at, ImageRecord.id)
                                     .order_by(ImageRecord.created_at, ImageRecord.id).offset(n // 2).limit(1)).one()
            with recorder.record() as st:
                scope_page(session, Scope.of(run_row), (middle[0], middle[1]), 2048)
        text_, warn = explain(settings, "enqueue: one keyset page", st)
        explains.append(text_)
        warnings += warn

        with session_scope(settings) as session:
            sample = [list(c) for c in session.scalars(
                select(RescoreChunk.image_ids).where(RescoreChunk.run_id == run.id)
                .order_by(RescoreChunk.first_id).limit(args.chunks))]
        per_chunk = []
        with progress(f"{n:,} images: bookkeeping of {len(sample)} chunks"):
            for i, chunk in enumerate(sample):
                if i == 0:
                    with recorder.record() as st:
                        rescore.rescore_chunk(run.id, chunk, settings)
                    text_, warn = explain(settings, "bookkeeping: one chunk (rescore_chunk)", st)
                    explains.append(text_)
                    warnings += warn
                    continue
                start = time.perf_counter()
                rescore.rescore_chunk(run.id, chunk, settings)
                per_chunk.append((time.perf_counter() - start) * 1000)
        with progress(f"{n:,} images: completing the run's other chunks in bulk (not measured)"):
            complete_rest(settings, run.id)

        from web import create_app

        client = create_app(settings).test_client()
        headers = {"Authorization": f"Bearer {ids['key']}"}
        rng = random.Random(n)
        jobs = ids["jobs"]
        reads = {
            "changes": lambda i: f"/api/v1/changes?run={run.id}&limit=100",
            "status": lambda i: f"/api/v1/jobs/{rng.choice(jobs)}",
            "results": lambda i: f"/api/v1/jobs/{rng.choice(jobs)}/results?limit=100",
        }
        latencies = {}
        for name, path in reads.items():
            count = {"changes": args.requests // 2, "status": args.requests, "results": args.requests // 2}[name]
            with progress(f"{n:,} images: {count} x {name}"):
                latencies[name] = timed_requests(client, headers, path, count)
            with recorder.record() as st:
                client.get(path(0), headers=headers)
            text_, warn = explain(settings, f"GET {name}", st)
            explains.append(text_)
            warnings += warn

        # The worker's claim of a chunk and the sweeper, on a job of pending images.
        from sqlalchemy import text

        from worker.dispatch import requeue_lost
        from worker.pipeline import claim_chunk

        with get_engine(settings).begin() as conn:
            pending = [r[0] for r in conn.execute(text(
                "UPDATE images SET status = 'pending' WHERE id IN (SELECT id FROM images WHERE job_id = :j "
                "ORDER BY position LIMIT :k) RETURNING id"), {"j": jobs[0], "k": args.chunk})]
            conn.execute(text("UPDATE jobs SET status = 'running', updated_at = now() - interval '1 day' "
                              "WHERE id = :j"), {"j": jobs[0]})
        with recorder.record() as st:
            claim_chunk(jobs[0], pending, settings)
        text_, warn = explain(settings, "worker: claim a chunk", st)
        explains.append(text_)
        warnings += warn
        with get_engine(settings).begin() as conn:
            conn.execute(text("UPDATE jobs SET updated_at = now() - interval '1 day' WHERE id = :j"), {"j": jobs[0]})
        with recorder.record() as st:
            requeue_lost(settings)
        text_, warn = explain(settings, "sweeper: requeue_lost", st)
        explains.append(text_)
        warnings += warn

        explain_path = out_dir / f"scale-explain-{n}.txt"
        explain_path.write_text("\n\n".join(explains) + "\n")
        if args.explain:
            print("\n\n".join(explains))  # noqa: T201 - asked for with --explain
        return {
            "images": n, "chunk_size": args.chunk, "enqueue_s": round(enqueue_s, 2),
            "enqueue_us_per_image": enqueue_s / n * 1e6,
            "bookkeeping_ms_per_chunk": statistics.median(per_chunk),
            "bookkeeping_ms_per_chunk_p99": percentile(per_chunk, 99),
            "changes_first_page_ms_p50": percentile(latencies["changes"], 50),
            "changes_first_page_ms_p99": percentile(latencies["changes"], 99),
            "status_poll_ms_p50": percentile(latencies["status"], 50),
            "status_poll_ms_p99": percentile(latencies["status"], 99),
            "results_page_ms_p50": percentile(latencies["results"], 50),
            "results_page_ms_p99": percentile(latencies["results"], 99),
            "explain": str(explain_path), "seq_scans_of_big_tables": warnings,
        }
    finally:
        dispose_engines()
        db.close()


ROWS = [  # (label, key, unit, key shown in parentheses)
    ("nightly re-score enqueue, per image", "enqueue_us_per_image", "us", None),
    ("bookkeeping per chunk of 32, median (p99)", "bookkeeping_ms_per_chunk", "ms", "bookkeeping_ms_per_chunk_p99"),
    ("change report first page of 100, p99 (p50)", "changes_first_page_ms_p99", "ms", "changes_first_page_ms_p50"),
    ("status poll, p99 (p50)", "status_poll_ms_p99", "ms", "status_poll_ms_p50"),
    ("results page of 100 + its audit row, p99 (p50)", "results_page_ms_p99", "ms", "results_page_ms_p50"),
]


def table(results: list[dict[str, Any]]) -> tuple[str, bool]:
    """A Markdown table of the per-item costs at each size and the ratio of the largest to the smallest."""
    small, large = results[0], results[-1]
    head = ["measure", *[f"{r['images']:,} images" for r in results]]
    if len(results) > 1:
        head.append(f"ratio {large['images'] // 1000:,}k/{small['images'] // 1000:,}k")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    flat = True
    for label, key, unit, extra in ROWS:
        cells = [label, *[f"{r[key]:.2f} {unit}" + (f" ({r[extra]:.2f})" if extra else "") for r in results]]
        if len(results) > 1:
            ratio = large[key] / small[key]
            flat = flat and ratio <= FLAT
            cells.append(f"{ratio:.2f}x" + ("" if ratio <= FLAT else " (NOT FLAT)"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), flat


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark at each size and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="image counts, comma-separated")
    parser.add_argument("--chunk", type=int, default=32, help="chunk size (SKINSCAN_CHUNK_SIZE's default)")
    parser.add_argument("--chunks", type=int, default=201, help="chunks timed through the bookkeeping")
    parser.add_argument("--requests", type=int, default=400, help="status polls (half as many of the others)")
    parser.add_argument("--explain", action="store_true", help="print the EXPLAIN of every query")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "benchmarks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "skinscan", "worker", "web"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    print("NOTE: the model is replaced by a constant-time scorer in this benchmark (and only here): "  # noqa: T201
          "it measures bookkeeping, queries and the API, not the network.")
    started = time.time()
    with redis_database() as redis_url:
        results = [run_size(int(s), args, args.out, redis_url) for s in args.sizes.split(",")]
    text_, flat = table(results)
    load = os.getloadavg()
    summary = {"results": results, "flat": flat, "limit_ratio": FLAT, "cpu_count": os.cpu_count(),
               "load_average_at_end": list(load), "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "duration_s": round(time.time() - started, 1)}
    (args.out / "scale.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(text_)  # noqa: T201 - the benchmark's result
    print(f"\n{os.cpu_count()} CPUs, load average at the end {load[0]:.1f}; "  # noqa: T201
          f"EXPLAINs in {args.out}/scale-explain-<size>.txt; JSON in {args.out / 'scale.json'}")
    for r in results:
        for w in r["seq_scans_of_big_tables"]:
            print(f"warning ({r['images']:,} images): {w} (a table of more than 10,000 rows)")  # noqa: T201
    print("per-item costs flat (within 1.5x)" if flat else "NOT FLAT: some per-item cost grew more than 1.5x")  # noqa: T201
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
