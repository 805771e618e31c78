"""Deterministic interleaving of two PostgreSQL connections: run other work right after a chosen statement of this
thread, and go on only once that work has committed or waits on a lock this thread holds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Engine, event


def lock_waiters(database_url: str) -> int:
    """How many backends of the database wait on a lock now."""
    url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                           " AND wait_event_type = 'Lock'").fetchone()
    return int(row[0]) if row else 0


class Others:
    """Work started in threads of their own (each with its own connection), with their results or errors."""

    def __init__(self, work: list[Callable[[], Any]]) -> None:
        self.results: list[Any] = [None] * len(work)
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(n, w), daemon=True) for n, w in enumerate(work)]

    def _run(self, n: int, work: Callable[[], Any]) -> None:
        try:
            self.results[n] = work()
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.errors.append(exc)

    def start(self) -> None:
        """Start every thread."""
        for t in self.threads:
            t.start()

    def settle(self, database_url: str, timeout: float = 30.0) -> None:
        """Wait until each thread has finished or waits on a lock (held, in the end, by the calling thread)."""
        deadline = time.monotonic() + timeout
        while True:
            alive = sum(t.is_alive() for t in self.threads)
            if alive == 0 or lock_waiters(database_url) >= alive:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{alive} interleaved threads neither finished nor waited on a lock")
            time.sleep(0.05)

    def join(self, timeout: float = 60.0) -> list[Any]:
        """Wait for every thread; re-raise the first error; return the results."""
        for t in self.threads:
            t.join(timeout)
            assert not t.is_alive(), "an interleaved thread did not finish"
        if self.errors:
            raise self.errors[0]
        return self.results


@contextmanager
def after_statement(engine: Engine, database_url: str, match: Callable[[str], bool],
                    *work: Callable[[], Any]) -> Iterator[Others]:
    """Right after the first statement of this thread that `match`es, run `work` in threads and let them settle.

    Leaving the block joins the threads (re-raising their errors) and fails if no statement matched.
    """
    main = threading.get_ident()
    others = Others(list(work))
    fired = threading.Event()

    def after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if fired.is_set() or threading.get_ident() != main or not match(statement):
            return
        fired.set()
        others.start()
        others.settle(database_url)

    event.listen(engine, "after_cursor_execute", after)
    try:
        yield others
    finally:
        event.remove(engine, "after_cursor_execute", after)
    assert fired.is_set(), "no statement matched: nothing was interleaved"
    others.join()
