"""Leases on broker messages: a live worker keeps renewing the messages it holds, a dead one's expire quickly.

Redis has no acknowledgement of its own: kombu keeps every delivered, unacknowledged message in an `unacked`
hash, indexed by delivery time in the `unacked_index` sorted set, and any worker puts a message whose time is
older than the visibility timeout back on its queue. With a short visibility timeout, a worker killed mid-task
(SIGKILL, OOM, power loss) gets its messages back on the queue within seconds; this consumer step renews the
time of every message a live worker holds (running, reserved or waiting for a retry's countdown) several times
per visibility timeout, so a task that runs longer than the timeout is never delivered a second time.

The stalled-job sweeper reads the same structures (queue_snapshot, one atomic read) to tell a lost chunk from one
that is still waiting in the queue or held by a live worker.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)


class LeaseSupportError(RuntimeError):
    """The installed kombu lacks a private field lease renewal reads: renewal would silently do nothing."""


# What lease renewal and the sweeper read of kombu's Redis transport (private API, checked at worker start).
CHANNEL_FIELDS = ("qos", "QoS", "unacked_key", "unacked_index_key", "conn_or_acquire")
QOS_FIELDS = {"_delivered": Mapping, "_dirty": (set, frozenset)}


class _ProbeChannel:
    """Just enough of a channel to build a QoS object and read its fields (restores nothing when collected)."""

    do_restore = False


def missing_lease_fields(channel_class: Any = None) -> list[str]:
    """Return the kombu fields lease renewal needs that the Redis channel class (and its QoS) lacks."""
    if channel_class is None:
        from kombu.transport.redis import Channel as channel_class
    name = channel_class.__name__
    missing = [f"{name}.{field}" for field in CHANNEL_FIELDS if not hasattr(channel_class, field)]
    qos_class = getattr(channel_class, "QoS", None)
    if qos_class is None:
        return missing
    try:
        qos = qos_class(_ProbeChannel())
    except Exception as exc:  # noqa: BLE001 - a changed constructor is a missing field too
        return [*missing, f"{qos_class.__name__}(channel) ({type(exc).__name__}: {exc})"]
    collect = getattr(qos, "_on_collect", None)
    if collect is not None:
        collect.cancel()  # the probe has no messages to restore
    for field, kind in QOS_FIELDS.items():
        if not isinstance(getattr(qos, field, None), kind):
            missing.append(f"{qos_class.__name__}.{field}")
    return missing


def require_lease_support(channel_class: Any = None) -> None:
    """Raise LeaseSupportError naming every missing field unless lease renewal can work with this kombu."""
    missing = missing_lease_fields(channel_class)
    if missing:
        from importlib.metadata import version

        raise LeaseSupportError(
            f"kombu {version('kombu')} lacks {', '.join(missing)}, which lease renewal (worker/leases.py) reads: "
            "without them every task running longer than the visibility timeout would be delivered twice. "
            "Install the kombu and celery versions pinned in pyproject.toml.")


def lease_interval(visibility_timeout: int) -> float:
    """Seconds between renewals: a third of the visibility timeout (at least one second)."""
    return max(1.0, visibility_timeout / 3)


def held_delivery_tags(channel: Any) -> list[str]:
    """Delivery tags of the messages this channel holds unacknowledged (empty for other transports)."""
    qos = channel.qos  # fields checked at worker start (require_lease_support)
    done = qos._dirty
    return [tag for tag in list(qos._delivered) if tag not in done]


def renew_leases(channel: Any) -> int:
    """Mark every message the channel holds as delivered now (only those still unacked); return how many."""
    tags = held_delivery_tags(channel)
    index = channel.unacked_index_key
    if not tags:
        return 0
    now = time.time()
    with channel.conn_or_acquire() as client:
        # XX: only refresh entries still there; one another worker already restored is never brought back.
        client.zadd(index, {tag: now for tag in tags}, xx=True)
    return len(tags)


def _task_id(raw: bytes | str) -> str | None:
    """The Celery task id in a kombu Redis message (protocol 2 keeps it in the headers), or None."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # an `unacked` entry: [message, exchange, routing key]
            message = message[0]
        task_id = message["headers"]["id"]
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return task_id if isinstance(task_id, str) else None


# One atomic read of what workers hold (the `unacked` hash) and what waits in a queue (its length and the `depth`
# messages at its right end, the next to be delivered): no delivery can fall between the two, as it could between
# two round trips. Its size is bounded by the workers' prefetch and the retries waiting for their countdown.
_SNAPSHOT = """
local held = redis.call('HVALS', KEYS[1])
local length = redis.call('LLEN', KEYS[2])
local head = redis.call('LRANGE', KEYS[2], -tonumber(ARGV[1]), -1)
return {held, length, head}
"""


def queue_snapshot(channel: Any, queue: str, depth: int = 20) -> tuple[set[str], int, list[str]]:
    """(task ids every worker holds now, length of a queue, task ids of its next `depth` messages, the next to be
    delivered first), read in one Lua script.

    kombu's Redis transport publishes with LPUSH and consumes with BRPOP from the right, and puts a message whose
    lease ran out back at the right: what waits at the right end is the oldest message in the queue.
    """
    key = channel.unacked_key  # fields checked at worker start (require_lease_support)
    with channel.conn_or_acquire() as client:
        held_raw, length, raws = client.register_script(_SNAPSHOT)(keys=[key, queue], args=[depth])
    held = (_task_id(raw) for raw in held_raw)
    head = (_task_id(raw) for raw in reversed(raws))
    return {i for i in held if i is not None}, int(length), [i for i in head if i is not None]


class LeaseRenewal(bootsteps.StartStopStep):
    """Consumer step: renew the leases of held messages from the worker's event loop (Redis broker only)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.tref: Any = None
        if _redis_broker(c.app):
            require_lease_support()  # refuse to start a worker whose renewal would be a silent no-op

    def start(self, c: Any) -> None:
        """Schedule the renewal on the consumer's timer."""
        options = c.app.conf.broker_transport_options or {}
        if not _redis_broker(c.app):
            return
        self.tref = c.timer.call_repeatedly(lease_interval(int(options.get("visibility_timeout", 3600))),
                                            self.renew, (c,), priority=10)

    def renew(self, c: Any) -> None:
        """Renew now; a broker hiccup is logged and retried at the next tick (never breaks the worker)."""
        consumer = getattr(c, "task_consumer", None)
        channel = getattr(consumer, "channel", None)
        if channel is None:
            return
        try:
            renew_leases(channel)
        except Exception:  # noqa: BLE001 - the connection may be down; kombu reconnects, we try again
            log.warning("could not renew the leases of held tasks; retrying", exc_info=True)

    def stop(self, c: Any) -> None:
        """Cancel the renewal (the consumer restarts it after a reconnect)."""
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def shutdown(self, c: Any) -> None:
        """Cancel the renewal at shutdown."""
        self.stop(c)


def _redis_broker(app: Any) -> bool:
    return str(app.conf.broker_url or "").startswith(("redis://", "rediss://"))
