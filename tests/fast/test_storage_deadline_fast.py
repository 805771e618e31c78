"""Every storage call ends by one overall deadline against a slow S3 server on a real socket: a server that never
answers, one that trickles its answer byte by byte (each read within the per-try timeout), and one that answers
503 at once. Before, a read held its thread for 5 tries x 30 s."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from skinscan.s3http import RetryPolicy
from skinscan.storage import S3Storage, StorageError

TIMEOUT, DEADLINE = 1.0, 2.5
SLACK = 0.6  # scheduling on a loaded 2-core machine


class SlowS3:
    """A TCP server that reads each request's head and then misbehaves as told (`mode`)."""

    def __init__(self, mode: str) -> None:
        self.mode, self.requests = mode, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while not self.stop.is_set():
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                self.requests += 1
                if self.mode == "silent":
                    self.stop.wait(60)  # never answers (and never reads a PUT's body)
                elif self.mode == "trickle":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                    while not self.stop.wait(0.2):
                        conn.sendall(b"x")  # each byte well within the per-try timeout
                else:  # busy
                    conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\n\r\n")
        except OSError:
            return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture()
def aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)


def _slow(mode: str) -> Iterator[tuple[SlowS3, S3Storage]]:
    server = SlowS3(mode)
    storage = S3Storage("bucket", f"http://127.0.0.1:{server.port}", RetryPolicy(timeout=TIMEOUT, deadline=DEADLINE))
    yield server, storage
    server.close()


CALLS = {
    "get": lambda s: s.get("images/a.jpg"),
    "put": lambda s: s.put("images/a.jpg", b"j" * 8_000_000, "image/jpeg"),  # more than the socket buffers take
    "exists": lambda s: s.exists("images/a.jpg"),
    "delete": lambda s: s.delete("images/a.jpg"),
    "list_keys": lambda s: s.list_keys("images/"),
    "check": lambda s: s.check(),
}


def _timed(storage: S3Storage, call: str) -> tuple[float, BaseException | None]:
    """Run one call in a thread (so a call that hangs fails the test in bounded time); (seconds, error)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            CALLS[call](storage)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE + 10)
    assert outcome, f"{call} still running {DEADLINE + 10} s after it began (deadline {DEADLINE} s)"
    return time.monotonic() - started, outcome[0]


@pytest.mark.parametrize("call", list(CALLS))
def test_a_server_that_never_answers_is_given_up_at_the_deadline(aws: None, call: str) -> None:
    for server, storage in _slow("silent"):
        elapsed, error = _timed(storage, call)
        assert isinstance(error, StorageError), (call, error)
        assert elapsed <= DEADLINE + SLACK, f"{call} gave up after {elapsed:.2f} s (deadline {DEADLINE} s)"
        assert elapsed >= TIMEOUT - 0.1, (call, elapsed)  # it did wait for the server
        if call not in ("list_keys", "check"):  # boto3's calls start only with one whole timeout left
            assert server.requests >= 2, f"{call}: {server.requests} tries within the deadline"
            assert "deadline" in str(error), error


@pytest.mark.parametrize("call", ["get", "exists", "delete"])
def test_a_trickled_answer_is_cut_at_the_deadline(aws: None, call: str) -> None:
    for _server, storage in _slow("trickle"):
        elapsed, error = _timed(storage, call)
        if call == "exists" and error is None:
            continue  # a HEAD's answer has no body: 200 is the whole answer
        assert isinstance(error, StorageError), (call, error)
        assert elapsed <= DEADLINE + SLACK, f"{call} gave up after {elapsed:.2f} s (deadline {DEADLINE} s)"


def test_a_busy_server_is_tried_a_bounded_number_of_times(aws: None) -> None:
    for server, storage in _slow("busy"):
        elapsed, error = _timed(storage, "get")
        assert isinstance(error, StorageError) and "HTTP 503" in str(error), error
        assert elapsed <= DEADLINE + SLACK and server.requests == RetryPolicy().tries


def test_settings_give_every_storage_the_policy(monkeypatch: pytest.MonkeyPatch, aws: None) -> None:
    from skinscan.settings import load_settings
    from skinscan.storage import get_storage

    monkeypatch.setenv("S3_BUCKET", "deadline-policy")
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SKINSCAN_STORAGE_TIMEOUT_SECONDS", "3")
    monkeypatch.setenv("SKINSCAN_STORAGE_DEADLINE_SECONDS", "4")
    storage = get_storage(load_settings())
    assert isinstance(storage, S3Storage)
    assert (storage.policy.timeout, storage.policy.deadline) == (3, 4)
