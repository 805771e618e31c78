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
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)


def lease_interval(visibility_timeout: int) -> float:
    """Seconds between renewals: a third of the visibility timeout (at least one second)."""
    return max(1.0, visibility_timeout / 3)


def held_delivery_tags(channel: Any) -> list[str]:
    """Delivery tags of the messages this channel holds unacknowledged (empty for other transports)."""
    qos = getattr(channel, "qos", None)
    delivered = getattr(qos, "_delivered", None)
    if not delivered:
        return []
    done = getattr(qos, "_dirty", set())
    return [tag for tag in list(delivered) if tag not in done]


def renew_leases(channel: Any) -> int:
    """Mark every message the channel holds as delivered now (only those still unacked); return how many."""
    tags = held_delivery_tags(channel)
    index = getattr(channel, "unacked_index_key", None)
    if not tags or index is None:
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
    key = getattr(channel, "unacked_key", "unacked")
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

    def start(self, c: Any) -> None:
        """Schedule the renewal on the consumer's timer."""
        options = c.app.conf.broker_transport_options or {}
        if not str(c.app.conf.broker_url or "").startswith(("redis://", "rediss://")):
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
