"""S3 object reads and writes over plain keep-alive HTTP: SigV4 presigned URLs and a small retrying client.

Images are read once per score and written once per upload, so the client's cost per object is paid thousands of
times a job. boto3's `generate_presigned_url` costs about 0.28 ms of CPU and urllib3's pool 0.65 ms per request on
the 2-core VM; the signer here (the SigV4 signing key derived once per day, one HMAC per URL) and `http.client`
(one keep-alive connection per thread and host) do the same for about 0.4 ms in all. Proxies, listing, deletes and
everything else stay with boto3.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

log = logging.getLogger(__name__)

ALGORITHM = "AWS4-HMAC-SHA256"
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
        return Response(answer.status, answer.reason, data)

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
