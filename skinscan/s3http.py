"""S3 object reads and writes over plain keep-alive HTTP: botocore-signed presigned URLs, checksummed bodies and a
small retrying client.

Images are read once per score and written once per upload, so the client's cost per object is paid thousands of
times a job. boto3's `get_object` costs about 1.5 ms of CPU and urllib3's pool 0.65 ms per request on the 2-core
VM; here the request is signed by botocore's own SigV4 query signer (S3SigV4QueryAuth) and sent over `http.client`
(one keep-alive connection per thread and host). Every PUT carries a Content-MD5 (checked by the server before it
stores anything) and an x-amz-checksum-crc32 (stored with the object), both among the signed headers, so a URL
replayed or a body changed on the way cannot store other bytes; every GET asks for the stored CRC32 and checks the
bytes it received against it. HEAD and DELETE go the same way; listings, bucket checks and everything behind a
proxy stay with boto3. Every call runs under one RetryPolicy: a timeout per try, jittered backoff between tries and
an overall deadline that bounds every connect, send and read.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.client
import io
import logging
import os
import random
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest

log = logging.getLogger(__name__)

# A presigned URL is used at once by this process (its retries included): a minute is plenty.
URL_EXPIRES = 60
CRC32_HEADER = "x-amz-checksum-crc32"
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
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case


class ChecksumMismatch(ValueError):
    """An object's bytes differ from the checksum stored with them."""


def crc32_b64(data: bytes) -> str:
    """The object checksum S3 keeps for x-amz-checksum-crc32: the big-endian CRC32, base64."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode("ascii")


def put_checksums(data: bytes) -> dict[str, str]:
    """Headers that make the server refuse a body other than `data` (Content-MD5) and store its CRC32."""
    return {"Content-MD5": base64.b64encode(hashlib.md5(data).digest()).decode("ascii"),  # noqa: S324 - S3's
            CRC32_HEADER: crc32_b64(data), "x-amz-sdk-checksum-algorithm": "CRC32"}


GET_CHECKSUM = {"x-amz-checksum-mode": "ENABLED"}  # ask for the stored checksum with the object


def verify_get(response: Response) -> bool:
    """Check a GET's bytes against the CRC32 stored with the object; False when the server sent none (an object
    stored before checksums were sent). Raises ChecksumMismatch when they differ."""
    stored = response.headers.get(CRC32_HEADER)
    if stored is None or "-" in stored:  # a multipart object's composite checksum is not the body's
        return False
    got = crc32_b64(response.data)
    if got != stored:
        raise ChecksumMismatch(f"CRC32 of the {len(response.data)} bytes received is {got}, the stored one {stored}")
    return True


class Presigner:
    """Query-string SigV4 signatures for path-style S3 URLs by botocore's own signer (S3SigV4QueryAuth), with the
    headers given (content type, checksums) among the signed ones."""

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

    def path(self, bucket: str, key: str) -> str:
        """The URL path of an object: the bucket, then the key percent-encoded as S3 expects ('/' kept)."""
        return f"{self.base_path}/{quote(bucket, safe='')}/{quote(key, safe='/~')}"

    def presign(self, method: str, bucket: str, key: str, credentials: Credentials, expires: int = URL_EXPIRES,
                content_type: str | None = None, headers: dict[str, str] | None = None) -> str:
        """Return the path and query (no scheme or host) of a URL that allows `method` on one object, signed with
        `headers` (and the content type) as they must then be sent."""
        signed = dict(headers or {})
        if content_type is not None:
            signed["Content-Type"] = content_type
        request = AWSRequest(method=method, url=f"{self.scheme}://{self.host}{self.path(bucket, key)}",
                             headers=signed)
        S3SigV4QueryAuth(credentials, "s3", self.region, expires=expires).add_auth(request)
        url = urlsplit(request.url)
        return f"{url.path}?{url.query}"


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
        return Response(answer.status, answer.reason, data, {k.lower(): v for k, v in answer.getheaders()})

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
