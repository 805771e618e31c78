"""`skinscan` sub-commands that run or administer the service: serve, web, worker, beat, migrate, clinics, users."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import secrets
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from skinscan.settings import Settings

log = logging.getLogger("skinscan")


def load_settings() -> Settings:
    """Read the settings; imported here so that `skinscan --help` does not load the settings machinery."""
    from skinscan.settings import load_settings as load

    return load()


def _check_model(settings: Settings) -> None:
    """Exit with a clear message unless a model bundle is configured and loads."""
    from skinscan.model.bundle import BundleError, load_bundle
    from skinscan.model.registry import configured_bundle_path

    try:
        path = configured_bundle_path(settings)
        bundle = load_bundle(path)
    except BundleError as exc:
        raise SystemExit(
            f"no usable model bundle: {exc}\nSet SKINSCAN_MODEL to a bundle folder written by `skinscan train` "
            "(or reinstall SkinScan, which ships a default bundle)."
        ) from None
    log.debug("model bundle %s (%s)", bundle.version, path)


def _prepare_database(settings: Settings) -> None:
    from skinscan.db import session_scope
    from skinscan.migrate import upgrade
    from skinscan.model.registry import ensure_production_model

    upgrade(settings)
    with session_scope(settings) as session:
        ensure_production_model(session, settings)


def requeue_unfinished(settings: Settings) -> int:
    """Enqueue every open job's pending images again (after a restart of the embedded service)."""
    from sqlalchemy import select

    from skinscan.db import session_scope
    from skinscan.jobs.dispatch import enqueue_job
    from skinscan.tables import Job

    n = 0
    with session_scope(settings) as session:
        ids = list(session.scalars(select(Job.id).where(Job.status.in_(("uploading", "queued", "running")))))
        for job_id in ids:
            n += enqueue_job(session, job_id, settings, resend=True)
    return n


def _sign_in_help(settings: Settings, url: str) -> str:
    """Tell how to sign in to the web pages: the first clinic and user to create, or where to sign in."""
    from sqlalchemy import func, select

    from skinscan.db import session_scope
    from skinscan.tables import Clinic, User

    with session_scope(settings) as session:
        users = session.scalar(select(func.count()).select_from(User)) or 0
        clinic = session.scalars(select(Clinic.name).order_by(Clinic.created_at)).first()
    if users:
        return (f"Sign in at {url}signin with a web user's email and password (`skinscan users list` shows them; "
                "`skinscan users reset-password EMAIL` sets a new password).")
    me = command_name()
    first = "" if clinic else f'{me} clinics create "My Clinic"\n    '
    return (f"No web user exists yet. To sign in at {url}signin, create one in another terminal "
            f"(it asks for a password):\n    {first}{me} users create {_quote(clinic or 'My Clinic')} "
            "you@example.org")


def command_name() -> str:
    """How the user started this command line: `skinscan` when it is on PATH, else the path they typed."""
    import shutil

    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "skinscan"
    if os.path.basename(argv0) != "skinscan":
        return "skinscan"  # python -m skinscan.cli, or a test harness
    found = shutil.which("skinscan")
    if found and os.path.realpath(found) == os.path.realpath(argv0):
        return "skinscan"
    return argv0


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text) if " " not in text or '"' in text else f'"{text}"'


def _quiet_embedded_worker() -> None:
    """`serve` runs its worker in-process on a memory broker: Celery's "running as root" advice and the broker's
    connection chatter are not for its user (-v shows the chatter)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"(?s).*running the worker with superuser privileges")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("kombu.connection", "celery.worker.consumer.connection", "celery.worker.consumer.mingle"):
            logging.getLogger(name).setLevel(logging.ERROR)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run web and worker in one process on the embedded defaults (SQLite, local folder, memory broker)."""
    from skinscan.cli.console import log_to_file

    settings = load_settings()
    verbose = bool(args.verbose or args.serve_verbose)
    log_file = log_to_file(settings.data_dir, verbose)
    if settings.redis_url:
        log.warning("REDIS_URL is set: `skinscan serve` still runs its own in-process worker")
    _check_model(settings)
    _prepare_database(settings)
    from werkzeug.serving import make_server

    from web import create_app
    from worker.celery_app import worker_celery

    celery_app = worker_celery(settings)
    app = create_app(settings)
    server = make_server(args.host, args.port, app, threaded=True)
    threading.Thread(target=server.serve_forever, name="web", daemon=True).start()
    url = f"http://{args.host}:{server.server_port}/"
    log.debug("SkinScan at %s (data in %s)", url, settings.data_dir)
    print(f"SkinScan running at {url} (data in {settings.data_dir}); Ctrl+C to stop.\n"  # noqa: T201
          f"Requests and tasks are logged to {log_file}" + ("" if verbose else " (--verbose: here too)") + ".\n"
          f"{_sign_in_help(settings, url)}", flush=True)
    requeue_unfinished(settings)
    _quiet_embedded_worker()
    try:
        celery_app.worker_main(["--quiet", "worker", "--pool", "solo", "--queues", "skinscan,rescore",
                                "--loglevel", settings.log_level, "--without-heartbeat", "--without-gossip",
                                "--without-mingle"])
    finally:
        server.shutdown()
    return 0


def _warn_if_privileged(settings: Settings) -> None:
    """In production: refuse object storage without credentials (ConfigError), and log a warning if this
    process's database role could switch the audit triggers off."""
    if settings.production:
        from skinscan.db_roles import warn_if_privileged
        from skinscan.storage import get_storage

        get_storage(settings)
        warn_if_privileged(settings)


def cmd_web(args: argparse.Namespace) -> int:
    """Run the web app under gunicorn (production)."""
    settings = load_settings()
    settings.check_production()
    _warn_if_privileged(settings)
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
    _warn_if_privileged(settings)
    _check_model(settings)
    from skinscan.model.predictor import available_cores

    gpus = _cuda_devices()
    cores = available_cores()  # the cores this worker is given (affinity, cgroup quota), not the host's
    # One process per GPU; on a CPU one per core. Measured on 2-core CPUs: N processes with one compute thread
    # each beat one process with N threads, and more compute threads than cores collapse throughput.
    concurrency = args.concurrency or gpus or cores
    if not settings.threads and not gpus:
        os.environ["SKINSCAN_THREADS"] = str(max(1, cores // concurrency))
        from skinscan.settings import load_settings as cached

        cached.cache_clear()  # the worker's processes read the settings again, with it
    if settings.worker_nice > 0:
        # Batch scoring yields the CPU to whatever shares the machine (the web's requests, the database):
        # status polls stay fast while a job runs, and the worker still gets every cycle nobody else wants.
        os.nice(settings.worker_nice)
    from worker.celery_app import worker_celery
    from worker.leases import LeaseSupportError, require_lease_support

    if settings.redis_url:
        try:
            require_lease_support()
        except LeaseSupportError as exc:
            raise SystemExit(f"refusing to start the worker: {exc}") from None
    worker_celery(settings).worker_main(["worker", "--queues", args.queues, "--concurrency", str(concurrency),
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
    _warn_if_privileged(settings)
    from worker.celery_app import worker_celery

    schedule = settings.data_dir / "celerybeat-schedule"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    worker_celery(settings).start(["beat", "--loglevel", settings.log_level, "--schedule", str(schedule)])
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


def cmd_check_storage(args: argparse.Namespace) -> int:
    """Compare the bucket with the database (after a restore); delete what no row claims with --delete."""
    from skinscan.storage_check import check_storage, report

    result = check_storage(load_settings(), delete=args.delete)
    print(report(result))  # noqa: T201 - the command's output
    return 0 if result.consistent else 1


def cmd_migrate(args: argparse.Namespace) -> int:
    """Upgrade (or downgrade) the database schema."""
    from skinscan.migrate import downgrade, upgrade

    settings = load_settings()
    if args.downgrade:
        downgrade(settings, args.downgrade)
    else:
        upgrade(settings, args.revision)
        from skinscan.db_roles import grant_runtime_role

        grant_runtime_role(settings)  # SKINSCAN_DB_RUNTIME_ROLE: web, worker and beat's least-privilege role
    return 0


def _actor() -> str:
    """The audit actor of a command-line change: cli:<login name>."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def cmd_clinics_create(args: argparse.Namespace) -> int:
    """Create a clinic and print its API key, labelled, on the last line."""
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
        created = clinic is None
        if clinic is None:
            clinic = Clinic(name=args.name)
            session.add(clinic)
            session.flush()
        key = create_api_key(session, clinic)
        audit.record(session, "clinic.key_created", _actor(), clinic.id, "clinic", clinic.id)
    log.debug("clinic %s: API key created", args.name)
    what = "created" if created else "has a new API key"
    print(f"Clinic {args.name!r} {what} (data in {_where(settings)}). The key is shown once: keep it "  # noqa: T201
          "somewhere safe; `skinscan submit` reads it from SKINSCAN_API_KEY.")
    print(f"API key: {key}")  # noqa: T201 - the key is the command's output
    return 0


def _where(settings: Settings) -> str:
    """Where the data lives, as a person would look for it: the data folder, or the database's host."""
    if settings.database_url.startswith("sqlite"):
        return str(settings.data_dir)
    from sqlalchemy.engine import make_url

    url = make_url(settings.database_url)
    return f"database {url.database} on {url.host or 'localhost'}"


def _fmt_time(value: object) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if hasattr(value, "strftime") else "-"


def cmd_clinics_list(_args: argparse.Namespace) -> int:
    """List the clinics with their active API keys, web users and jobs."""
    from sqlalchemy import func, select

    from skinscan.db import session_scope
    from skinscan.migrate import upgrade
    from skinscan.tables import ApiKey, Clinic, Job, User

    settings = load_settings()
    upgrade(settings)
    with session_scope(settings) as session:
        def per_clinic(model: type[ApiKey] | type[User] | type[Job], *where: object) -> dict[str, int]:
            query = (select(model.clinic_id, func.count())
                     .where(*where).group_by(model.clinic_id))  # type: ignore[arg-type]
            return {clinic_id: n for clinic_id, n in session.execute(query).all()}

        keys = per_clinic(ApiKey, ApiKey.revoked_at.is_(None))
        users = per_clinic(User)
        jobs = per_clinic(Job)
        clinics = list(session.scalars(select(Clinic).order_by(Clinic.name)))
        if not clinics:
            print(f"No clinics yet in {_where(settings)}: create one with "  # noqa: T201
                  '`skinscan clinics create "My Clinic"`.')
            return 0
        width = max(len("Clinic"), *(len(c.name) for c in clinics))
        print(f"{'Clinic':<{width}}  {'Keys':>4}  {'Users':>5}  {'Jobs':>5}  {'Retention':>9}  Created")  # noqa: T201
        for c in clinics:
            kept = f"{c.retention_days} d" if c.retention_days else "keep"
            print(f"{c.name:<{width}}  {keys.get(c.id, 0):>4}  {users.get(c.id, 0):>5}  "  # noqa: T201
                  f"{jobs.get(c.id, 0):>5}  {kept:>9}  {_fmt_time(c.created_at)}")
    return 0


def cmd_clinics_retention(args: argparse.Namespace) -> int:
    """Set how many days a clinic's jobs are kept after upload (or keep them); audited."""
    from sqlalchemy import select

    from skinscan import audit
    from skinscan.db import session_scope
    from skinscan.migrate import upgrade
    from skinscan.retention import check_days
    from skinscan.tables import Clinic

    try:
        days = check_days(None if args.keep else args.days)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    settings = load_settings()
    upgrade(settings)
    with session_scope(settings) as session:
        clinic = session.scalars(select(Clinic).where(Clinic.name == args.name)).first()
        if clinic is None:
            raise SystemExit(f"no clinic named {args.name!r}; `skinscan clinics list` shows them")
        before, clinic.retention_days = clinic.retention_days, days
        audit.record(session, "clinic.retention", _actor(), clinic.id, "clinic", clinic.id,
                     {"from_days": before, "to_days": days})
    when = (f"{days} day{'s' if days != 1 else ''} after upload, then deleted with their images by the nightly run "
            f"({settings.retention_hour:02d}:{settings.retention_minute:02d} UTC)") if days else "until deleted by hand"
    print(f"Clinic {args.name!r}: jobs are kept {when}.")  # noqa: T201
    return 0


def cmd_apply_retention(args: argparse.Namespace) -> int:
    """Delete every job past its clinic's retention now, a batch at a time (what the nightly run does)."""
    from skinscan.retention import delete_expired
    from skinscan.tables import utcnow

    settings = load_settings()
    now, deleted, left = utcnow(), 0, 0
    while True:
        run = delete_expired(settings, now=now, limit=args.batch)
        deleted, left = deleted + run.deleted, left + run.objects_left
        if not run.more:
            break
    log.info("retention: %d jobs deleted%s", deleted,
             f"; {left} stored objects left for the orphan sweeper" if left else "")
    print(deleted)  # noqa: T201 - the command's output: how many jobs were deleted
    return 0


def _clinic_named(session: object, name: str) -> object:
    """The clinic of this name, or SystemExit naming the command that lists them."""
    from sqlalchemy import select

    from skinscan.tables import Clinic

    clinic = session.scalars(select(Clinic).where(Clinic.name == name)).first()  # type: ignore[attr-defined]
    if clinic is None:
        raise SystemExit(f"no clinic named {name!r} (`skinscan clinics list` shows them)")
    return clinic


def cmd_clinics_keys(args: argparse.Namespace) -> int:
    """List a clinic's API keys by prefix (the keys themselves are never stored)."""
    from skinscan.api_keys import list_keys
    from skinscan.db import session_scope

    settings = load_settings()
    with session_scope(settings) as session:
        keys = list_keys(session, _clinic_named(session, args.clinic).id)  # type: ignore[attr-defined]
    print(f"{'Prefix':<14}{'Created':<18}Revoked")  # noqa: T201
    for k in keys:
        print(f"{k.prefix:<14}{_fmt_time(k.created_at):<18}{_fmt_time(k.revoked_at)}")  # noqa: T201
    return 0


def _key_change_failed(exc: Exception) -> SystemExit:
    return SystemExit(f"{exc}; nothing was changed (`skinscan clinics keys CLINIC` lists the keys)")


def cmd_clinics_revoke_key(args: argparse.Namespace) -> int:
    """Revoke one of a clinic's API keys by its prefix; audited."""
    from skinscan.api_keys import ApiKeyError, revoke_key
    from skinscan.db import session_scope

    settings = load_settings()
    try:
        with session_scope(settings) as session:
            clinic = _clinic_named(session, args.clinic)
            revoke_key(session, clinic.id, _actor(), prefix=args.prefix)  # type: ignore[attr-defined]
    except ApiKeyError as exc:
        raise _key_change_failed(exc) from None
    print(f"Key {args.prefix} of {args.clinic!r} revoked: it is refused (401) by every web process within "  # noqa: T201
          f"{settings.api_key_cache_seconds} s (SKINSCAN_API_KEY_CACHE_SECONDS).")
    return 0


def cmd_clinics_rotate_key(args: argparse.Namespace) -> int:
    """Issue a clinic a new API key and revoke the old one (or every active one); audited."""
    from skinscan.api_keys import ApiKeyError, rotate_key
    from skinscan.db import session_scope

    settings = load_settings()
    try:
        with session_scope(settings) as session:
            clinic = _clinic_named(session, args.clinic)
            key, revoked = rotate_key(session, clinic, _actor(), prefix=args.prefix)  # type: ignore[arg-type]
    except ApiKeyError as exc:
        raise _key_change_failed(exc) from None
    print(f"Revoked {', '.join(revoked) or 'no key'} of {args.clinic!r} (refused within "  # noqa: T201
          f"{settings.api_key_cache_seconds} s). The new key is shown once: keep it somewhere safe.")
    print(f"API key: {key}")  # noqa: T201 - the key is the command's output
    return 0


def _read_password(args: argparse.Namespace) -> tuple[str, bool]:
    """Return (password, generated): from standard input (--password-stdin, or a pipe: standard input is not a
    terminal), SKINSCAN_USER_PASSWORD, a prompt on a terminal, or generated when nothing is given."""
    if getattr(args, "password", None) is not None:
        raise SystemExit("--password is no longer accepted: a password on the command line is visible to every "
                         "user of the machine (ps, /proc); pipe it in with --password-stdin, or leave both out "
                         "to be asked for it")
    generated = False
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise SystemExit("--password-stdin: no password on standard input")
    else:
        password = os.environ.get("SKINSCAN_USER_PASSWORD") or ""
        if not password and sys.stdin is not None and not sys.stdin.isatty():
            password = sys.stdin.readline().rstrip("\r\n")  # `echo secret | skinscan users create ...`
    if not password:
        if sys.stdin is not None and sys.stdin.isatty():
            password = getpass.getpass("Password: ")
            if getpass.getpass("Password again: ") != password:
                raise SystemExit("the two passwords differ; nothing was changed")
        else:
            password, generated = secrets.token_urlsafe(12), True
    if len(password) < 8:
        raise SystemExit("the password must be at least 8 characters")
    return password, generated


def cmd_users_create(args: argparse.Namespace) -> int:
    """Add a user who signs in to the web pages for a clinic."""
    from sqlalchemy import select

    from skinscan import audit
    from skinscan.db import session_scope
    from skinscan.migrate import upgrade
    from skinscan.security import hash_password
    from skinscan.tables import Clinic, User

    password, generated = _read_password(args)
    settings = load_settings()
    upgrade(settings)
    with session_scope(settings) as session:
        clinic = session.scalars(select(Clinic).where(Clinic.name == args.clinic)).first()
        if clinic is None:
            raise SystemExit(f"no clinic named {args.clinic!r}; create it with `skinscan clinics create`")
        if session.scalars(select(User).where(User.email == args.email.lower())).first():
            raise SystemExit(f"a user {args.email!r} exists already")
        session.add(User(clinic_id=clinic.id, email=args.email.lower(), password_hash=hash_password(password)))
        audit.record(session, "user.create", _actor(), clinic.id, "user", args.email.lower())
    if generated:
        print(f"password: {password}")  # noqa: T201 - shown once
    print(f"User {args.email.lower()} added to clinic {args.clinic!r}; "  # noqa: T201
          "they sign in with it on the web pages.")
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    """List the web users (email, clinic, created), optionally of one clinic."""
    from sqlalchemy import select

    from skinscan.db import session_scope
    from skinscan.migrate import upgrade
    from skinscan.tables import Clinic, User

    settings = load_settings()
    upgrade(settings)
    with session_scope(settings) as session:
        query = select(User.email, Clinic.name, User.created_at).join(Clinic, Clinic.id == User.clinic_id)
        if args.clinic:
            if session.scalars(select(Clinic.id).where(Clinic.name == args.clinic)).first() is None:
                raise SystemExit(f"no clinic named {args.clinic!r} (`skinscan clinics list` shows them)")
            query = query.where(Clinic.name == args.clinic)
        rows = session.execute(query.order_by(Clinic.name, User.email)).all()
    if not rows:
        print("No web users yet: add one with `skinscan users create CLINIC EMAIL`.")  # noqa: T201
        return 0
    width = max(len("Email"), *(len(r[0]) for r in rows))
    print(f"{'Email':<{width}}  {'Created':<16}  Clinic")  # noqa: T201
    for email, clinic, created in rows:
        print(f"{email:<{width}}  {_fmt_time(created):<16}  {clinic}")  # noqa: T201
    return 0


def cmd_users_reset_password(args: argparse.Namespace) -> int:
    """Set a new password for a web user (signs them out everywhere); audited."""
    from sqlalchemy import select

    from skinscan import audit
    from skinscan.db import session_scope
    from skinscan.migrate import upgrade
    from skinscan.security import hash_password
    from skinscan.tables import User

    settings = load_settings()
    upgrade(settings)
    email = args.email.strip().lower()
    with session_scope(settings) as session:  # the user must exist before a password is asked for
        if session.scalars(select(User.id).where(User.email == email)).first() is None:
            raise SystemExit(f"no user {args.email!r} (`skinscan users list` shows them)")
    password, generated = _read_password(args)
    with session_scope(settings) as session:
        user = session.scalars(select(User).where(User.email == email)).one()
        user.password_hash = hash_password(password)
        audit.record(session, "user.password_reset", _actor(), user.clinic_id, "user", email)
    if generated:
        print(f"password: {password}")  # noqa: T201 - shown once
    print(f"Password of {email} changed; their open web sessions are signed out.")  # noqa: T201
    return 0


def add_service_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the service sub-commands on the `skinscan` parser."""
    port = int(os.environ.get("PORT", "8000"))
    p = sub.add_parser("serve", help="embedded all-in-one service (web + worker, SQLite, local images)",
                       description="Run the web pages, the API and a scoring worker in one process, with the data "
                                   "in SKINSCAN_DATA_DIR (SQLite, local image folder). Prints how to sign in.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine)")
    p.add_argument("--port", type=int, default=port, help="port to listen on (default: $PORT or 8000)")
    p.add_argument("--verbose", dest="serve_verbose", action="store_true",
                   help="show every request and task log on the console too (always in skinscan.log in the data "
                        "folder)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("web", help="production web server (gunicorn)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=port, help="port to listen on (default: $PORT or 8000)")
    p.add_argument("--workers", type=int, default=int(os.environ.get("WEB_CONCURRENCY", "2")),
                   help="gunicorn worker processes (default: $WEB_CONCURRENCY or 2)")
    p.add_argument("--threads", type=int, default=4, help="threads per worker process (default: %(default)s)")
    p.set_defaults(func=cmd_web)

    p = sub.add_parser("worker", help="production Celery worker")
    p.add_argument("--concurrency", type=int, default=0,
                   help="processes (default: 1 per GPU, else 1 per core the worker is given)")
    p.add_argument("--queues", default="skinscan,rescore", help="Celery queues to consume (default: %(default)s)")
    p.add_argument("--hostname", default="skinscan@%h", help="Celery node name (default: %(default)s)")
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

    p = sub.add_parser("check-storage", help="after a restore: compare the bucket with the database (objects no "
                                             "row claims, rows whose object is gone); exit 1 unless they agree",
                       description="Lists the whole bucket. Run it on a restored deployment before starting web, "
                                   "worker and beat (README: Backup and restore).")
    p.add_argument("--delete", action="store_true",
                   help="delete the objects no row claims (stored after the database dump was taken)")
    p.set_defaults(func=cmd_check_storage)

    p = sub.add_parser("migrate", help="upgrade the database schema")
    p.add_argument("--revision", default="head", help="schema revision to upgrade to (default: %(default)s)")
    p.add_argument("--downgrade", default=None, metavar="REVISION", help="downgrade to this revision instead")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("clinics", help="create and list clinics; list, revoke and rotate their API keys")
    csub = p.add_subparsers(dest="clinics_command", required=True)
    c = csub.add_parser("create", help="create a clinic; prints its API key, labelled, on the last line")
    c.add_argument("name", help="the clinic's name (quote it if it has spaces)")
    c.add_argument("--new-key", action="store_true", help="issue another key for an existing clinic")
    c.add_argument("--no-migrate", dest="migrate", action="store_false",
                   help="do not bring the database schema up to date first")
    c.set_defaults(func=cmd_clinics_create)
    c = csub.add_parser("list", help="list the clinics with their numbers of active keys, web users and jobs")
    c.set_defaults(func=cmd_clinics_list)
    c = csub.add_parser("keys", help="list a clinic's API keys by prefix, with when each was revoked")
    c.add_argument("clinic", help="the clinic's name")
    c.set_defaults(func=cmd_clinics_keys)
    c = csub.add_parser("revoke-key", help="revoke one API key of a clinic (by its prefix); audited")
    c.add_argument("clinic", help="the clinic's name")
    c.add_argument("prefix", help="the key's first 12 characters (`skinscan clinics keys CLINIC`)")
    c.set_defaults(func=cmd_clinics_revoke_key)
    c = csub.add_parser("rotate-key", help="issue a new API key and revoke the old one; audited")
    c.add_argument("clinic", help="the clinic's name")
    c.add_argument("prefix", nargs="?", default=None,
                   help="the key to replace (default: every active key of the clinic)")
    c.set_defaults(func=cmd_clinics_rotate_key)
    c = csub.add_parser("retention", help="how long a clinic's jobs are kept after upload (audited)",
                        description="Jobs older than this are deleted with their images and results by the nightly "
                                    "run (SKINSCAN_RETENTION_HOUR/MINUTE UTC), each audited as a manual delete.")
    c.add_argument("name", help="the clinic's name")
    kept = c.add_mutually_exclusive_group(required=True)
    kept.add_argument("--days", type=int, help="keep each job this many days after its upload")
    kept.add_argument("--keep", action="store_true", help="keep jobs until they are deleted by hand (the default)")
    c.set_defaults(func=cmd_clinics_retention)

    p = sub.add_parser("apply-retention", help="delete now every job past its clinic's retention (what the "
                                               "nightly run does; prints how many)")
    p.add_argument("--batch", type=int, default=None, metavar="JOBS",
                   help="jobs per transaction batch (default: SKINSCAN_RETENTION_BATCH)")
    p.set_defaults(func=cmd_apply_retention)

    p = sub.add_parser("users", help="manage web users (create, list, reset-password)")
    usub = p.add_subparsers(dest="users_command", required=True)
    password_help = ("read the password from the first line of standard input (also done when standard input is a "
                     "pipe; else SKINSCAN_USER_PASSWORD, a prompt on a terminal, or a generated one printed once)")
    u = usub.add_parser("create", help="add a user who signs in to the web pages for a clinic")
    u.add_argument("clinic", help="the clinic's name, as given to `skinscan clinics create`")
    u.add_argument("email", help="the user's email address: their sign-in name")
    u.add_argument("--password-stdin", action="store_true", help=password_help)
    u.add_argument("--password", default=None, help=argparse.SUPPRESS)  # refused: argv is visible in ps
    u.set_defaults(func=cmd_users_create)
    u = usub.add_parser("list", help="list the web users and their clinics")
    u.add_argument("--clinic", default=None, help="only the users of this clinic")
    u.set_defaults(func=cmd_users_list)
    u = usub.add_parser("reset-password", help="set a new password for a web user (their sessions end); audited")
    u.add_argument("email", help="the user's email address")
    u.add_argument("--password-stdin", action="store_true", help=password_help)
    u.add_argument("--password", default=None, help=argparse.SUPPRESS)  # refused: argv is visible in ps
    u.set_defaults(func=cmd_users_reset_password)

    from skinscan.cli.submit import add_arguments as submit_arguments

    p = sub.add_parser("submit", help="upload images (files, zips, folders) to a SkinScan server and save the "
                                      "results",
                       description="Upload the images of every PATH (files, zips, folders) as one job, follow it "
                                   "while it is scored, "
                                   "write the results CSV and print a summary. The API key is read from "
                                   "SKINSCAN_API_KEY (so it stays out of the shell history).")
    submit_arguments(p)

    from skinscan.cli.submit import add_results_arguments

    p = sub.add_parser("results", help="save any job's results CSV from a SkinScan server",
                       description="Write the results CSV of a job (the scored images so far, if it is still "
                                   "running). The API key is read from SKINSCAN_API_KEY.")
    add_results_arguments(p)


__all__ = ["add_service_commands", "load_settings"]
