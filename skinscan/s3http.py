"""S3 object reads and writes over plain keep-alive HTTP: SigV4 presigned URLs and a small retrying client.

Images are read once per score and written once per upload, so the client's cost per object is paid thousands of
times a job. boto3's `generate_presigned_url` costs about 0.28 ms of CPU and urllib3's pool 0.65 ms per request on
the 2-core VM; the signer here (the SigV4 signing key derived once per day, one HMAC per URL) and `http.client`
(one keep-alive connection per thread and host) do the same for about 0.4 ms in all. Proxies, listing, deletes and
everything else stay with boto3.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import http.client
import io
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

log = logging.getLogger(__name__)

ALGORITHM = "AWS4-HMAC-SHA256"
# Statuses worth another try (the server is busy or restarting), as the AWS SDKs do.
RETRY_STATUSES = frozenset({500, 502, 503, 504})
T = TypeVar("T")


class DeadlineExceeded(TimeoutError):
    """An object operation used up its overall deadline (every try and backoff included)."""


@dataclass(frozen=True)
class RetryPolicy:
    """One policy for every storage call: each try (connect, send, answer) lasts at most `timeout` seconds with
    the presigned client (with boto3, each wait for the server does), tries are spaced by exponential backoff with
    full jitter, and the whole operation, tries and waits together, ends by `deadline` seconds after it began."""

    timeout: float = 10.0
    deadline: float = 15.0
    backoff: float = 0.2
    backoff_max: float = 2.0
    tries: int = 5  # at most, however fast the failures come (a server answering 503 at once)

    def pause(self, attempt: int) -> float:
        """Seconds to wait before try `attempt + 1` (full jitter: uniform in [0, base * 2**attempt])."""
        return random.uniform(0, min(self.backoff_max, self.backoff * 2 ** attempt))  # noqa: S311 - not crypto

    def run(self, what: str, call: Callable[[float, float], T], retryable: Callable[[BaseException], bool],
            give_up_when: Callable[[T], bool] = lambda _: True, try_timeout_floor: float = 0.0) -> T:
        """Call `call(try_timeout, end)` until it succeeds, a non-retryable error, or the deadline.

        `call` gets this try's timeout (at most `timeout`, never past the deadline) and the deadline as a
        time.monotonic() value. A result for which give_up_when() is false (a 5xx answer) is tried again while
        time is left, and returned as it is on the last try. A try is started only with at least
        `try_timeout_floor` seconds left (a client that cannot be given a shorter timeout per call).
        """
        end = time.monotonic() + max(self.deadline, self.timeout)
        attempt = 0
        while True:
            left = end - time.monotonic()
            if left <= 0 or left < try_timeout_floor:
                raise DeadlineExceeded(f"{what}: no answer within the {max(self.deadline, self.timeout):g} s deadline "
                                       f"({attempt} tries)")
            try:
                result = call(min(self.timeout, left), end)
            except BaseException as exc:
                if not retryable(exc):
                    raise
                failure: BaseException | None = exc
            else:
                failure = None
                if give_up_when(result):
                    return result
            attempt += 1
            if attempt >= self.tries:
                if failure is not None:
                    raise failure
                return result
            pause = self.pause(attempt - 1)
            left = end - time.monotonic()
            if pause >= left or left - pause < max(try_timeout_floor, 0.05):
                if failure is not None:
                    raise DeadlineExceeded(f"{what}: gave up at the {max(self.deadline, self.timeout):g} s deadline "
                                           f"after {attempt} tries: {failure}") from failure
                return result
            log.debug("%s: try %d failed (%s); again in %.2f s", what, attempt, failure or "retryable answer", pause)
            time.sleep(pause)


@dataclass(frozen=True)
class Credentials:
    """An access key pair, with the session token of temporary credentials."""

    access_key: str
    secret_key: str
    token: str | None = None


@dataclass(frozen=True)
class Response:
    """A finished HTTP exchange: status, reason phrase and the whole body."""

    status: int
    reason: str
    data: bytes


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


class Presigner:
    """Query-string SigV4 signatures (UNSIGNED-PAYLOAD) for path-style S3 URLs, as `generate_presigned_url` with
    `signature_version="s3v4"` makes them: same canonical request, same signed headers, same URL."""

    def __init__(self, endpoint_url: str, region: str) -> None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) endpoint URL: {endpoint_url!r}")
        self.scheme = parts.scheme
        self.hostname = parts.hostname
        default_port = 443 if self.scheme == "https" else 80
        self.port = parts.port or default_port
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        self.host = host if self.port == default_port else f"{host}:{self.port}"
        self.base_path = parts.path.rstrip("/")
        self.region = region
        self._keys: dict[tuple[str, str], bytes] = {}

    def _signing_key(self, secret: str, day: str) -> bytes:
        """The day's SigV4 key for this region and S3, derived once (four HMACs) and kept."""
        key = self._keys.get((secret, day))
        if key is None:
            key = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret).encode("utf-8"), day), self.region), "s3"),
                        "aws4_request")
            self._keys = {(secret, day): key}  # one day, one secret at a time: rotated credentials replace it
        return key

    def path(self, bucket: str, key: str) -> str:
        """The URL path of an object: the bucket, then the key percent-encoded as S3 expects ('/' kept)."""
        return f"{self.base_path}/{quote(bucket, safe='')}/{quote(key, safe='/~')}"

    def presign(self, method: str, bucket: str, key: str, credentials: Credentials, expires: int = 300,
                content_type: str | None = None, now: datetime | None = None) -> str:
        """Return the path and query (no scheme or host) of a URL that allows `method` on one object."""
        now = now or datetime.now(UTC)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        scope = f"{day}/{self.region}/s3/aws4_request"
        headers = {"host": self.host}
        if content_type is not None:
            headers["content-type"] = content_type
        signed = ";".join(sorted(headers))
        params = {
            "X-Amz-Algorithm": ALGORITHM,
            "X-Amz-Credential": f"{credentials.access_key}/{scope}",
            "X-Amz-Date": amz_date,
            "X-Amz-Expires": str(expires),
            "X-Amz-SignedHeaders": signed,
        }
        if credentials.token:
            params["X-Amz-Security-Token"] = credentials.token
        query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items()))
        path = self.path(bucket, key)
        canonical_headers = "".join(f"{name}:{headers[name].strip()}\n" for name in sorted(headers))
        canonical = "\n".join((method, path, query, canonical_headers, signed, "UNSIGNED-PAYLOAD"))
        to_sign = "\n".join((ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()))
        signature = hmac.new(self._signing_key(credentials.secret_key, day), to_sign.encode("utf-8"),
                             hashlib.sha256).hexdigest()
        return f"{path}?{query}&X-Amz-Signature={signature}"


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each given only the time left before the deadline (a server trickling bytes cannot
    hold the call past it)."""

    def __init__(self, sock: socket.socket, raw: Any, end: float) -> None:
        self._sock, self._raw, self._end = sock, raw, end  # raw: the socket's SocketIO (keeps it open while read)

    def readable(self) -> bool:
        """A reader."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Read what the socket has, waiting no longer than the deadline."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the storage server did not answer before the deadline")
        self._sock.settimeout(left)
        return self._raw.readinto(buffer)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Release the socket's reference (the connection decides whether it stays open)."""
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """An HTTP response read under the request's deadline."""

    def __init__(self, sock: socket.socket, *args: Any, end: float, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        raw = self.fp.detach()  # the SocketIO under http.client's buffered reader, not closed
        self.fp = io.BufferedReader(_DeadlineReader(sock, raw, end))  # type: ignore[assignment]


class _DeadlineMixin:
    """Connection sends bounded by the time left, responses read under the deadline."""

    sock: socket.socket | None
    end = float("inf")

    def send(self, data: Any) -> None:
        if self.sock is not None:
            left = self.end - time.monotonic()
            if left <= 0:
                raise TimeoutError("the storage server did not take the request before the deadline")
            self.sock.settimeout(left)  # sendall: the timeout bounds the whole send (Python 3.5+)
        super().send(data)  # type: ignore[misc]

    def deadline(self, end: float, try_timeout: float) -> None:
        """Bound the next request: connect within try_timeout, every send and read by `end`."""
        self.end = min(end, time.monotonic() + try_timeout) if try_timeout else end
        self.timeout = max(0.001, min(try_timeout, self.end - time.monotonic()))
        self.response_class = functools.partial(_DeadlineResponse, end=self.end)  # type: ignore[assignment]


class _Connection(_DeadlineMixin, http.client.HTTPConnection):
    pass


class _TLSConnection(_DeadlineMixin, http.client.HTTPSConnection):
    pass


class ObjectClient:
    """GET and PUT of whole objects over keep-alive connections, one per thread, with retries.

    Connection errors, timeouts and 5xx answers are tried again with exponential backoff (a PUT of the same bytes
    to the same key is safe to repeat); a connection the server closed while idle is reopened at once.
    """

    def __init__(self, presigner: Presigner, policy: RetryPolicy | None = None, ca_file: str | None = None) -> None:
        self.presigner = presigner
        self.policy = policy or RetryPolicy()
        self._ssl = ssl.create_default_context(cafile=ca_file) if presigner.scheme == "https" else None
        self._local = threading.local()
        self._pid = os.getpid()

    def _connection(self) -> _Connection | _TLSConnection:
        if self._pid != os.getpid():  # a forked child (Celery's pool) never shares its parent's sockets
            self._local, self._pid = threading.local(), os.getpid()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            p = self.presigner
            if self._ssl is not None:
                conn = _TLSConnection(p.hostname, p.port, context=self._ssl)
            else:
                conn = _Connection(p.hostname, p.port)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _once(self, method: str, target: str, body: bytes | None, headers: dict[str, str], try_timeout: float,
              end: float) -> Response:
        conn = self._connection()
        conn.deadline(end, try_timeout)
        fresh = conn.sock is None
        try:
            if fresh:
                conn.connect()
            conn.request(method, target, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            self._drop()
            if fresh:
                raise
            log.debug("keep-alive connection closed by the server (%s); reconnecting", exc)
            return self._once(method, target, body, headers, try_timeout, end)  # a fresh connection, once
        except BaseException:
            self._drop()
            raise
        if answer.will_close:
            self._drop()
        return Response(answer.status, answer.reason, data)

    def request(self, method: str, target: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        """Send one request (target: path and query) under the policy: what a busy or restarting server causes is
        tried again, and the whole call ends by the deadline (DeadlineExceeded)."""
        headers = {"Host": self.presigner.host, **(headers or {})}
        return self.policy.run(
            f"{method} {target.split('?')[0]}",
            lambda try_timeout, end: self._once(method, target, body, headers, try_timeout, end),
            retryable=lambda exc: isinstance(exc, (OSError, http.client.HTTPException)),
            give_up_when=lambda response: response.status not in RETRY_STATUSES)


def frozen_credentials(source: Any) -> Credentials | None:
    """Return botocore credentials (static or refreshing) as Credentials now, or None if there are none."""
    if source is None:
        return None
    frozen = source.get_frozen_credentials()
    if not frozen.access_key or not frozen.secret_key:
        return None
    return Credentials(frozen.access_key, frozen.secret_key, frozen.token)
