"""Pure logic of the bounded re-score bookkeeping and the lost-chunk sweeper (no database, no broker)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from skinscan.changes import LABEL_CHANGED, NEWLY_FLAGGED, UNFLAGGED, CursorError, Position, classify
from skinscan.rescore_runs import bounded_errors
from worker.dispatch import ALWAYS, NEVER, QueueState, horizon, is_lost
from worker.rescore import NOT_SCORED, tally_chunk

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def test_cursor_round_trip_and_refusals() -> None:
    """A cursor decodes to the position it encodes; anything else is refused with CursorError."""
    for position in (Position(0, -0.987654321, "a" * 32), Position(1, 0.0, "abc"), Position(1, -1e-300, "z")):
        assert Position.decode(position.encode()) == position
    for bad in ("", "!!!", "bm90LWEtY3Vyc29y", Position(0, 0.5, "x").encode()[:-2],
                "WzIsMC41LCJhIl0", "WzAsIk5hTiIsImEiXQ", "WzAsMC41LDFd"):  # rank 2; NaN as text; id not a string
        with pytest.raises(CursorError):
            Position.decode(bad)


def test_classify_changes() -> None:
    """Newly flagged wins over a label change; no change in either is no line."""
    assert classify("nv", False, "mel", True) == NEWLY_FLAGGED
    assert classify("mel", True, "nv", False) == UNFLAGGED
    assert classify("nv", False, "bkl", False) == LABEL_CHANGED
    assert classify("mel", True, "mel", True) is None


def test_error_samples_keep_the_first_ones() -> None:
    """Samples stop growing at the limit; the first ones stay, later ones are dropped."""
    kept = bounded_errors(None, {f"i{n}": f"e{n}" for n in range(5)}, limit=3)
    assert kept == {"i0": "e0", "i1": "e1", "i2": "e2"}
    assert bounded_errors(kept, {"j": "x"}, limit=3) == kept
    assert bounded_errors({"i0": "first"}, {"i0": "again", "k": "y"}, limit=3) == {"i0": "first", "k": "y"}


def test_horizon_of_a_queue() -> None:
    """Empty, or no chunk of ours among a short queue: every chunk left it; a long unknown head: none did."""
    sent = {"t2": NOW - timedelta(minutes=5)}
    assert horizon(0, [], {}, 20) == ALWAYS
    assert horizon(3, ["beat", "t2", "t3"], sent, 20) == NOW - timedelta(minutes=5)
    assert horizon(3, ["beat", "other"], sent, 20) == ALWAYS
    assert horizon(500, ["beat"] * 20, sent, 20) == NEVER


def test_is_lost_only_when_old_delivered_and_not_held() -> None:
    """A chunk is lost only if sent before the cutoff, before the queue's horizon, and no worker holds it."""
    cutoff = NOW - timedelta(minutes=10)
    old = NOW - timedelta(hours=1)
    state = QueueState(held=frozenset({"held"}), horizon=NOW - timedelta(minutes=30))
    assert is_lost(old, "t", cutoff, state)
    assert not is_lost(old, "held", cutoff, state)  # a worker has it
    assert not is_lost(NOW - timedelta(minutes=5), "t", cutoff, state)  # too recent
    assert not is_lost(NOW - timedelta(minutes=20), "t", cutoff, state)  # may still wait behind the queue's head
    assert not is_lost(old, "t", cutoff, QueueState(horizon=NEVER))
    assert is_lost(old.replace(tzinfo=None), None, cutoff, QueueState())  # naive (SQLite) times are UTC


@dataclass
class P:
    """A prediction row's fields that tally_chunk reads."""

    id: int
    image_id: str
    model_version: str
    label: str
    flagged: bool
    malignancy: float
    created_at: datetime


def test_tally_chunk_counts_per_clinic() -> None:
    """Re-scored, failed (with or without a reason), changed and newly flagged per clinic; deleted images gone."""
    started = NOW - timedelta(hours=1)
    before, later, after = started - timedelta(days=2), started - timedelta(days=1), NOW
    preds = [
        P(1, "a", "m0", "nv", False, 0.1, before), P(2, "a", "m1", "nv", False, 0.1, later),  # latest old: m1
        P(3, "a", "new", "mel", True, 0.9, after),  # newly flagged
        P(4, "b", "m1", "nv", False, 0.2, later), P(5, "b", "new", "nv", False, 0.3, after),  # unchanged
        P(6, "c", "m1", "mel", True, 0.8, later), P(7, "c", "new", "bkl", False, 0.4, after),  # no longer flagged
        P(8, "d", "m1", "nv", False, 0.2, later),  # failed: no new prediction
        P(9, "e", "m1", "nv", False, 0.2, later),
    ]
    tally = tally_chunk(7, "new", started, 6, {"a": "k1", "b": "k1", "c": "k2", "d": "k2", "e": "k2"},
                        preds, {"d": "broken"})
    assert dict(tally.clinics["k1"]) == {"done": 2, "changed": 1, "flagged": 1}
    assert dict(tally.clinics["k2"]) == {"done": 1, "changed": 1, "flagged": 0, "failed": 2}
    assert tally.failures == {"d": "broken", "e": NOT_SCORED} and tally.gone == 1
    lines = {line["image_id"]: line for line in tally.changes}
    assert set(lines) == {"a", "c"}
    assert (lines["a"]["change"], lines["a"]["rank"], lines["a"]["previous_model"], lines["a"]["order_key"]) == (
        NEWLY_FLAGGED, 0, "m1", -0.9)
    assert (lines["c"]["change"], lines["c"]["rank"], lines["c"]["run_id"]) == (UNFLAGGED, 1, 7)
