"""Lease renewal reads kombu's private fields: a kombu without them is refused at worker start, never a no-op."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from kombu.transport import redis as kombu_redis

from worker import leases


def test_installed_kombu_has_every_field_renewal_reads() -> None:
    assert leases.missing_lease_fields() == []
    leases.require_lease_support()


def test_a_renamed_channel_field_is_named() -> None:
    class Bare:  # a channel class of a kombu that renamed unacked_index_key
        QoS = kombu_redis.QoS
        qos = None
        unacked_key = "unacked"

        def conn_or_acquire(self) -> None:
            """A stand-in."""

    with pytest.raises(leases.LeaseSupportError) as err:
        leases.require_lease_support(Bare)
    assert "Bare.unacked_index_key" in str(err.value)
    assert "kombu 5." in str(err.value) and "pyproject.toml" in str(err.value)


def test_a_renamed_qos_field_is_named() -> None:
    class QoS(kombu_redis.QoS):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._acked = self.__dict__.pop("_dirty")  # as if a release renamed it

    class Channel(kombu_redis.Channel):
        pass

    Channel.QoS = QoS
    assert leases.missing_lease_fields(Channel) == ["QoS._dirty"]


def test_a_qos_that_cannot_be_built_is_named() -> None:
    class QoS:
        def __init__(self, channel: Any, prefetch: int) -> None:
            """A constructor that changed its arguments."""

    class Channel(kombu_redis.Channel):
        pass

    Channel.QoS = QoS  # type: ignore[assignment]
    missing = leases.missing_lease_fields(Channel)
    assert len(missing) == 1 and missing[0].startswith("QoS(channel) (TypeError")


def test_worker_command_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from skinscan.cli import service

    def broken(channel_class: Any = None) -> None:
        raise leases.LeaseSupportError("kombu 9.0 lacks QoS._delivered")

    started: list[Any] = []
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setattr(service, "_check_model", lambda settings: None)
    monkeypatch.setattr(leases, "require_lease_support", broken)
    from celery import Celery

    monkeypatch.setattr(Celery, "worker_main", lambda self, argv: started.append(argv))
    monkeypatch.setattr(service.os, "nice", lambda n: None)
    with pytest.raises(SystemExit) as err:
        service.cmd_worker(argparse.Namespace(queues="skinscan", concurrency=1, hostname="t@h"))
    assert "refusing to start the worker: kombu 9.0 lacks QoS._delivered" in str(err.value)
    assert started == []


def test_consumer_step_refuses_on_a_redis_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    class App:
        class conf:  # noqa: N801 - Celery's attribute name
            broker_url = "redis://127.0.0.1:6379/0"

    class Consumer:
        app = App

    def broken(channel_class: Any = None) -> None:
        raise leases.LeaseSupportError("kombu 9.0 lacks Channel.unacked_index_key")

    monkeypatch.setattr(leases, "require_lease_support", broken)
    with pytest.raises(leases.LeaseSupportError, match="unacked_index_key"):
        leases.LeaseRenewal(Consumer)
    App.conf.broker_url = "memory://"
    leases.LeaseRenewal(Consumer)  # the embedded in-process broker has no leases to renew
