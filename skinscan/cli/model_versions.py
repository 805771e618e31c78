"""`skinscan models` (register, list, promote, rollback) and `skinscan rescore`: the model registry by hand."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from skinscan.cli.service import load_settings  # lazy: `skinscan --help` does not load the settings machinery

if TYPE_CHECKING:
    from skinscan.settings import Settings

log = logging.getLogger("skinscan")


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _prepared() -> Settings:
    """Settings, with the database schema brought up to date (a no-op when it is)."""
    from skinscan.migrate import upgrade

    settings = load_settings()
    upgrade(settings)
    return settings


def parse_since(text: str) -> datetime:
    """Parse --since: an ISO date (midnight UTC) or date-time (UTC unless it names its offset)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--since must be a date like 2026-11-01, not {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def cmd_models_register(args: argparse.Namespace) -> int:
    """Check a bundle (metadata, checksums, loads and scores an image) and register it without promoting it."""
    from skinscan.db import session_scope
    from skinscan.model.registry import RegistryError, register_bundle
    from skinscan.storage import StorageError

    settings = _prepared()
    image = Path(args.image).read_bytes() if args.image else None
    try:
        with session_scope(settings) as session:
            row = register_bundle(session, Path(args.bundle), _actor(), image, backend=args.backend,
                                  settings=settings)
            version, status, prefix = row.version, row.status, row.storage_prefix
    except (RegistryError, StorageError) as exc:
        raise SystemExit(f"not registered: {exc}") from None
    print(f"registered {version} ({status}), stored under {prefix}; "  # noqa: T201
          f"promote it with `skinscan models promote {version}`")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    """Print the registered model versions; the one in production is marked."""
    from skinscan.db import session_scope
    from skinscan.model.registry import list_models, model_summary

    settings = _prepared()
    with session_scope(settings) as session:
        rows = [model_summary(m) for m in list_models(session)]
    if args.json:
        print(json.dumps(rows, indent=2))  # noqa: T201 - the listing is the command's output
        return 0
    if not rows:
        print("no model registered yet")  # noqa: T201
    for r in rows:
        mark = "*" if r["status"] == "production" else " "
        print(f"{mark} {r['version']:<40} {r['status']:<11} {r['architecture']:<22} "  # noqa: T201
              f"registered {r['registered_at'][:19]}  promoted {(r['promoted_at'] or '-')[:19]}")
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    """Put a registered version in production; new jobs use it and the nightly re-score moves images to it."""
    from skinscan.db import session_scope
    from skinscan.model.registry import RegistryError, promote
    from skinscan.storage import StorageError

    settings = _prepared()
    try:
        with session_scope(settings) as session:
            promote(session, args.version, _actor(), settings)
    except (RegistryError, StorageError) as exc:
        raise SystemExit(f"not promoted: {exc}") from None
    print(f"{args.version} is in production")  # noqa: T201
    return 0


def cmd_models_rollback(_args: argparse.Namespace) -> int:
    """Put the version that served before the current one back in production."""
    from skinscan.db import session_scope
    from skinscan.model.registry import RegistryError, rollback
    from skinscan.storage import StorageError

    settings = _prepared()
    try:
        with session_scope(settings) as session:
            version = rollback(session, _actor(), settings).version
    except (RegistryError, StorageError) as exc:
        raise SystemExit(f"not rolled back: {exc}") from None
    print(f"rolled back: {version} is in production")  # noqa: T201
    return 0


def _clinic_id(settings: Settings, name_or_id: str | None) -> str | None:
    if name_or_id is None:
        return None
    from sqlalchemy import or_, select

    from skinscan.db import session_scope
    from skinscan.tables import Clinic

    with session_scope(settings) as session:
        clinic = session.scalars(select(Clinic).where(or_(Clinic.name == name_or_id, Clinic.id == name_or_id))).first()
        if clinic is None:
            raise SystemExit(f"no clinic named {name_or_id!r}")
        return clinic.id


def _print_run(summary: dict[str, object]) -> None:
    print(f"run {summary['id']} {summary['status']}: {summary['model_from'] or '-'} -> {summary['model_to']}, "  # noqa: T201
          f"{summary['done']}/{summary['images']} images re-scored, {summary['failed']} failed, "
          f"{summary['changed']} changed, {summary['flagged']} newly flagged"
          + (f", {summary['duration_s']:.1f}s" if summary["duration_s"] is not None else ""))


def cmd_rescore(args: argparse.Namespace) -> int:
    """Re-score stored images lacking a prediction of the production model (or list recent runs)."""
    from skinscan.db import session_scope
    from skinscan.rescore_runs import list_runs, run_summary
    from worker.rescore import start_rescore

    settings = _prepared()
    if args.list:
        with session_scope(settings) as session:
            for run in list_runs(session, limit=args.list):
                _print_run(run_summary(session, run))
        return 0
    inline = args.inline or settings.embedded
    run = start_rescore(settings, _clinic_id(settings, args.clinic), args.since, actor=_actor(),
                        chunk_size=args.chunk_size or None, inline=inline)
    if run is None:
        print("nothing to re-score: every image in scope has a prediction of the production model")  # noqa: T201
        return 0
    while args.wait and not inline:
        with session_scope(settings) as session:
            from skinscan.tables import RescoreRun

            current = session.get(RescoreRun, run.id)
            assert current is not None
            if current.status != "running":
                break
            log.info("run %d: %d of %d images re-scored", current.id, current.done, current.total)
        time.sleep(5)
    with session_scope(settings) as session:
        from skinscan.tables import RescoreRun

        final = session.get(RescoreRun, run.id)
        assert final is not None
        _print_run(run_summary(session, final))
    return 0


def add_model_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the `models` and `rescore` sub-commands on the `skinscan` parser."""
    p = sub.add_parser("models", help="the model registry: register, list, promote, rollback")
    msub = p.add_subparsers(dest="models_command", required=True)
    m = msub.add_parser("register", help="check a bundle and register it (it does not go into production)")
    m.add_argument("bundle", help="bundle folder written by `skinscan train` (workers must see the same path)")
    m.add_argument("--image", default=None, help="image to test-score (default: a synthetic one made in memory)")
    m.add_argument("--backend", choices=("auto", "onnx", "torch"), default="auto",
                   help="backend for the test-score (default: %(default)s)")
    m.set_defaults(func=cmd_models_register)
    m = msub.add_parser("list", help="registered versions; * marks the one in production")
    m.add_argument("--json", action="store_true", help="print the versions as JSON")
    m.set_defaults(func=cmd_models_list)
    m = msub.add_parser("promote", help="put a registered version in production (audited)")
    m.add_argument("version")
    m.set_defaults(func=cmd_models_promote)
    m = msub.add_parser("rollback", help="put the previous production version back (audited)")
    m.set_defaults(func=cmd_models_rollback)

    p = sub.add_parser("rescore", help="re-score stored images lacking a prediction of the production model")
    p.add_argument("--clinic", default=None, help="only this clinic's images (name or id)")
    p.add_argument("--since", type=parse_since, default=None, help="only images uploaded on or after this date")
    p.add_argument("--chunk-size", type=int, default=0, help="images per task (default: SKINSCAN_CHUNK_SIZE)")
    p.add_argument("--inline", action="store_true",
                   help="score in this process instead of queueing (always so without REDIS_URL)")
    p.add_argument("--wait", action="store_true", help="wait until the run is finished, logging progress")
    p.add_argument("--list", type=int, nargs="?", const=10, default=0, metavar="N",
                   help="show the newest N runs (default 10) instead of starting one")
    p.set_defaults(func=cmd_rescore)
