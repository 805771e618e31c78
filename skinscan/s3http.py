"""S3 object reads and writes over plain keep-alive HTTP: botocore-signed presigned URLs, checksummed bodies and a
small retrying client.

Images are read once per score and written once per upload, so the client's cost per object is paid thousands of
times a job. boto3's `get_object` costs about 1.5 ms of CPU and urllib3's pool 0.65 ms per request on the 2-core
VM; here the request is signed by botocore's own SigV4 query signer (S3SigV4QueryAuth) and sent over `http.client`
(one keep-alive connection per thread and host). Every PUT carries a Content-MD5 (checked by the server before it
stores anything) and an x-amz-checksum-crc32 (stored with the object), both among the signed headers, so a URL
replayed or a body changed on the way cannot store other bytes; every GET asks for the stored CRC32 and checks the
bytes it received against it. Proxies, listing, deletes and everything else stay with boto3.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import os
import ssl
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest

log = logging.getLogger(__name__)

# A presigned URL is used at once by this process (its retries included): a minute is plenty.
URL_EXPIRES = 60
CRC32_HEADER = "x-amz-checksum-crc32"
# Statuses worth another try (the server is busy or restarting), as the AWS SDKs do.
RETRY_STATUSES = frozenset({500, 502, 503, 504})


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


class ObjectClient:
    """GET and PUT of whole objects over keep-alive connections, one per thread, with retries.

    Connection errors, timeouts and 5xx answers are tried again with exponential backoff (a PUT of the same bytes
    to the same key is safe to repeat); a connection the server closed while idle is reopened at once.
    """

    def __init__(self, presigner: Presigner, connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 retries: int = 4, backoff: float = 0.2, ca_file: str | None = None) -> None:
        self.presigner = presigner
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.retries, self.backoff = retries, backoff
        self._ssl = ssl.create_default_context(cafile=ca_file) if presigner.scheme == "https" else None
        self._local = threading.local()
        self._pid = os.getpid()

    def _connection(self) -> http.client.HTTPConnection:
        if self._pid != os.getpid():  # a forked child (Celery's pool) never shares its parent's sockets
            self._local, self._pid = threading.local(), os.getpid()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            p = self.presigner
            if self._ssl is not None:
                conn = http.client.HTTPSConnection(p.hostname, p.port, timeout=self.connect_timeout,
                                                   context=self._ssl)
            else:
                conn = http.client.HTTPConnection(p.hostname, p.port, timeout=self.connect_timeout)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _once(self, method: str, target: str, body: bytes | None, headers: dict[str, str]) -> Response:
        conn = self._connection()
        fresh = conn.sock is None
        try:
            if fresh:
                conn.connect()
                conn.sock.settimeout(self.read_timeout)
            conn.request(method, target, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            self._drop()
            if fresh:
                raise
            log.debug("keep-alive connection closed by the server (%s); reconnecting", exc)
            return self._once(method, target, body, headers)  # a fresh connection, once
        except BaseException:
            self._drop()
            raise
        if answer.will_close:
            self._drop()
        return Response(answer.status, answer.reason, data, {k.lower(): v for k, v in answer.getheaders()})

    def request(self, method: str, target: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        """Send one request (target: path and query); retry what a busy or restarting server causes."""
        headers = {"Host": self.presigner.host, **(headers or {})}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._once(method, target, body, headers)
            except (OSError, http.client.HTTPException) as exc:
                if last:
                    raise
                log.debug("%s %s failed (%s); try %d of %d", method, target.split("?")[0], exc, attempt + 1,
                          self.retries + 1)
            else:
                if response.status not in RETRY_STATUSES or last:
                    return response
            time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")


def frozen_credentials(source: Any) -> Credentials | None:
    """Return botocore credentials (static or refreshing) as Credentials now, or None if there are none."""
    if source is None:
        return None
    frozen = source.get_frozen_credentials()
    if not frozen.access_key or not frozen.secret_key:
        return None
    return Credentials(frozen.access_key, frozen.secret_key, frozen.token)
