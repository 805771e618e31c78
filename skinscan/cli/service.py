"""`skinscan` sub-commands that run or administer the service: serve, web, worker, beat, migrate, clinics, users."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import secrets
import sys
import threading

from skinscan.settings import ConfigError, Settings, load_settings

log = logging.getLogger("skinscan")


def _check_model(settings: Settings) -> None:
    """Exit with a clear message unless a model bundle is configured and loads."""
    from skinscan.registry import configured_bundle_path
    from training.bundle import BundleError, load_bundle

    try:
        path = configured_bundle_path(settings)
        bundle = load_bundle(path)
    except BundleError as exc:
        raise SystemExit(
            f"no usable model bundle: {exc}\nSet SKINSCAN_MODEL to a bundle folder written by `skinscan train` "
            "(or reinstall SkinScan, which ships a default bundle)."
        ) from None
    log.info("model bundle %s (%s)", bundle.version, path)


def _prepare_database(settings: Settings) -> None:
    from skinscan.db import session_scope
    from skinscan.migrate import upgrade
    from skinscan.registry import ensure_production_model

    upgrade(settings)
    with session_scope(settings) as session:
        ensure_production_model(session, settings)


def requeue_unfinished(settings: Settings) -> int:
    """Enqueue every queued or running job again (after a restart of the embedded service)."""
    from sqlalchemy import select

    from skinscan.db import session_scope
    from skinscan.tables import Job
    from worker.dispatch import enqueue_job

    n = 0
    with session_scope(settings) as session:
        ids = list(session.scalars(select(Job.id).where(Job.status.in_(("queued", "running")))))
        for job_id in ids:
            n += enqueue_job(session, job_id, settings)
    return n


def cmd_serve(args: argparse.Namespace) -> int:
    """Run web and worker in one process on the embedded defaults (SQLite, local folder, memory broker)."""
    settings = load_settings()
    if settings.redis_url:
        log.warning("REDIS_URL is set: `skinscan serve` still runs its own in-process worker")
    _check_model(settings)
    _prepare_database(settings)
    from werkzeug.serving import make_server

    from web import create_app
    from worker.celery_app import celery_app

    app = create_app(settings)
    server = make_server(args.host, args.port, app, threaded=True)
    threading.Thread(target=server.serve_forever, name="web", daemon=True).start()
    log.info("SkinScan at http://%s:%d/ (data in %s); Ctrl+C to stop", args.host, server.server_port,
             settings.data_dir)
    print(f"SkinScan running at http://{args.host}:{server.server_port}/", flush=True)  # noqa: T201
    requeue_unfinished(settings)
    try:
        celery_app.worker_main(["worker", "--pool", "solo", "--queues", "skinscan,rescore",
                                "--loglevel", settings.log_level, "--without-heartbeat", "--without-gossip",
                                "--without-mingle"])
    finally:
        server.shutdown()
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    """Run the web app under gunicorn (production)."""
    settings = load_settings()
    settings.check_production()
    argv = ["--bind", f"{args.host}:{args.port}", "--workers", str(args.workers),
            "--threads", str(args.threads), "--timeout", "300", "--access-logfile", "-",
            "--config", "python:web.gunicorn_conf", "web:create_app()"]
    # gunicorn in a fresh interpreter (same pid): the web processes then carry only what the app imports, not
    # the command line's (the train command's parser imports torch: ~800 MB more in every web process).
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", *argv])
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a Celery worker (production); refuses to start without a usable model bundle."""
    settings = load_settings()
    settings.check_production()
    _check_model(settings)
    from training.predictor import available_cores

    gpus = _cuda_devices()
    cores = available_cores()  # the cores this worker is given (affinity, cgroup quota), not the host's
    # One process per GPU; on a CPU one per core. Measured on 2-core CPUs: N processes with one compute thread
    # each beat one process with N threads, and more compute threads than cores collapse throughput.
    concurrency = args.concurrency or gpus or cores
    if not settings.threads and not gpus:
        os.environ["SKINSCAN_THREADS"] = str(max(1, cores // concurrency))
    if settings.worker_nice > 0:
        # Batch scoring yields the CPU to whatever shares the machine (the web's requests, the database):
        # status polls stay fast while a job runs, and the worker still gets every cycle nobody else wants.
        os.nice(settings.worker_nice)
    from worker.celery_app import celery_app

    celery_app.worker_main(["worker", "--queues", args.queues, "--concurrency", str(concurrency),
                            "--loglevel", settings.log_level, "--hostname", args.hostname])
    return 0


def _cuda_devices() -> int:
    """Number of CUDA GPUs; asks NVML only, so the forking parent never initialises CUDA."""
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001
        return 0


def cmd_beat(_args: argparse.Namespace) -> int:
    """Run Celery beat: the nightly re-score and the stalled-job sweeper."""
    settings = load_settings()
    settings.check_production()
    from worker.celery_app import celery_app

    schedule = settings.data_dir / "celerybeat-schedule"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    celery_app.start(["beat", "--loglevel", settings.log_level, "--schedule", str(schedule)])
    return 0


def cmd_sweep_orphans(args: argparse.Namespace) -> int:
    """Delete stored images of uploads refused or interrupted longer ago than the grace period."""
    from skinscan.orphans import sweep_legacy_orphans, sweep_orphans

    settings = load_settings()
    removed = sweep_orphans(settings, grace_seconds=args.grace)
    if args.legacy:
        removed += sweep_legacy_orphans(settings, grace_seconds=args.grace)
    log.info("orphan sweep: %d stored images removed", removed)
    print(removed)  # noqa: T201 - the command's output: how many objects were removed
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Upgrade (or downgrade) the database schema."""
    from skinscan.migrate import downgrade, upgrade

    settings = load_settings()
    if args.downgrade:
        downgrade(settings, args.downgrade)
    else:
        upgrade(settings, args.revision)
    return 0


def cmd_clinics_create(args: argparse.Namespace) -> int:
    """Create a clinic and print its API key on the last line."""
    from sqlalchemy import select

    from skinscan import audit
    from skinscan.db import session_scope
    from skinscan.security import create_api_key
    from skinscan.tables import Clinic

    settings = load_settings()
    _prepare_database(settings) if args.migrate else None
    with session_scope(settings) as session:
        clinic = session.scalars(select(Clinic).where(Clinic.name == args.name)).first()
        if clinic is not None and not args.new_key:
            raise SystemExit(f"clinic {args.name!r} exists; pass --new-key to issue another key")
        if clinic is None:
            clinic = Clinic(name=args.name)
            session.add(clinic)
            session.flush()
        key = create_api_key(session, clinic)
        audit.record(session, "clinic.key_created", "cli", clinic.id, "clinic", clinic.id)
    log.info("clinic %s: API key created (shown once)", args.name)
    print(key)  # noqa: T201 - the key is the command's output
    return 0


def cmd_users_create(args: argparse.Namespace) -> int:
    """Add a user who signs in to the web pages for a clinic."""
    from sqlalchemy import select

    from skinscan import audit
    from skinscan.db import session_scope
    from skinscan.security import hash_password
    from skinscan.tables import Clinic, User

    if args.password is not None:
        raise SystemExit("--password is no longer accepted: a password on the command line is visible to every "
                         "user of the machine (ps, /proc); pipe it in with --password-stdin, or leave both out "
                         "to be asked for it")
    settings = load_settings()
    generated = False
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise SystemExit("--password-stdin: no password on standard input")
    else:
        password = os.environ.get("SKINSCAN_USER_PASSWORD") or ""
    if not password:
        if sys.stdin.isatty():
            password = getpass.getpass("Password: ")
            if getpass.getpass("Password again: ") != password:
                raise SystemExit("the two passwords differ; nothing was changed")
        else:
            password, generated = secrets.token_urlsafe(12), True
    if len(password) < 8:
        raise SystemExit("the password must be at least 8 characters")
    with session_scope(settings) as session:
        clinic = session.scalars(select(Clinic).where(Clinic.name == args.clinic)).first()
        if clinic is None:
            raise SystemExit(f"no clinic named {args.clinic!r}; create it with `skinscan clinics create`")
        if session.scalars(select(User).where(User.email == args.email.lower())).first():
            raise SystemExit(f"a user {args.email!r} exists already")
        session.add(User(clinic_id=clinic.id, email=args.email.lower(), password_hash=hash_password(password)))
        audit.record(session, "user.create", "cli", clinic.id, "user", args.email.lower())
    if generated:
        print(f"password: {password}")  # noqa: T201 - shown once
    log.info("user %s added to clinic %s", args.email, args.clinic)
    return 0


def add_service_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the service sub-commands on the `skinscan` parser."""
    p = sub.add_parser("serve", help="embedded all-in-one service (web + worker, SQLite, local images)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("web", help="production web server (gunicorn)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    p.add_argument("--workers", type=int, default=int(os.environ.get("WEB_CONCURRENCY", "2")))
    p.add_argument("--threads", type=int, default=4)
    p.set_defaults(func=cmd_web)

    p = sub.add_parser("worker", help="production Celery worker")
    p.add_argument("--concurrency", type=int, default=0,
                   help="processes (default: 1 per GPU, else 1 per core the worker is given)")
    p.add_argument("--queues", default="skinscan,rescore")
    p.add_argument("--hostname", default="skinscan@%h")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("beat", help="Celery beat (nightly re-scoring, stalled-job sweeper)")
    p.set_defaults(func=cmd_beat)

    p = sub.add_parser("sweep-orphans", help="delete stored images that no committed job claims (uploads refused "
                                             "or interrupted longer ago than SKINSCAN_ORPHAN_GRACE_SECONDS)")
    p.add_argument("--grace", type=int, default=None, metavar="SECONDS",
                   help="only uploads begun at least this long ago (default: SKINSCAN_ORPHAN_GRACE_SECONDS)")
    p.add_argument("--legacy", action="store_true",
                   help="also list the whole bucket for images stored before uploads recorded their intent "
                        "(once, after upgrading) and delete those no image row claims")
    p.set_defaults(func=cmd_sweep_orphans)

    p = sub.add_parser("migrate", help="upgrade the database schema")
    p.add_argument("--revision", default="head")
    p.add_argument("--downgrade", default=None, metavar="REVISION")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("clinics", help="manage clinics")
    csub = p.add_subparsers(dest="clinics_command", required=True)
    c = csub.add_parser("create", help="create a clinic; prints its API key on the last line")
    c.add_argument("name")
    c.add_argument("--new-key", action="store_true", help="issue another key for an existing clinic")
    c.add_argument("--no-migrate", dest="migrate", action="store_false")
    c.set_defaults(func=cmd_clinics_create)

    p = sub.add_parser("users", help="manage web users")
    usub = p.add_subparsers(dest="users_command", required=True)
    u = usub.add_parser("create", help="add a user to a clinic")
    u.add_argument("clinic")
    u.add_argument("email")
    u.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input (else SKINSCAN_USER_PASSWORD, "
                        "a prompt on a terminal, or a generated one that is printed once)")
    u.add_argument("--password", default=None, help=argparse.SUPPRESS)  # refused: argv is visible in ps
    u.set_defaults(func=cmd_users_create)

    from skinscan.cli.submit import add_arguments as submit_arguments

    p = sub.add_parser("submit", help="upload a folder of images to a SkinScan server and save the results")
    submit_arguments(p)


__all__ = ["add_service_commands", "ConfigError"]
