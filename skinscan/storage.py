"""Image storage behind one interface: an S3-compatible bucket (AWS, MinIO) or a local folder."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from skinscan.s3http import (
    GET_CHECKSUM,
    ChecksumMismatch,
    ObjectClient,
    Presigner,
    Response,
    RetryPolicy,
    frozen_credentials,
    put_checksums,
    verify_get,
)
from skinscan.settings import ConfigError, Settings, load_settings

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(RuntimeError):
    """Storage that cannot be reached or an object that cannot be read or written."""


class Storage(Protocol):
    """What web and worker need from image storage. Keys are opaque ids, never uploaded file names."""

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store bytes under key (overwriting is allowed and idempotent)."""

    def get(self, key: str) -> bytes:
        """Return the bytes stored under key (raises StorageError if missing)."""

    def exists(self, key: str) -> bool:
        """Return whether key is stored."""

    def delete(self, key: str) -> None:
        """Remove key if present."""

    def list_keys(self, prefix: str, older_than: float | None = None) -> list[str]:
        """Return every key that starts with prefix (a folder-like prefix ending in '/'), optionally only those
        last written before older_than (a Unix time)."""

    def check(self) -> None:
        """Raise StorageError unless storage is reachable and writable."""


class LocalStorage:
    """Objects as files below one folder (the embedded default)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if ".." in key.split("/") or key.startswith("/"):
            raise StorageError(f"invalid storage key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write atomically (temp file then rename) so a crash never leaves half an image."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        """Read a stored object."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"object {key} not found") from None

    def exists(self, key: str) -> bool:
        """Return whether the object's file exists; StorageError if the images folder itself is gone or unreadable."""
        if not self.root.is_dir():
            raise StorageError(f"images folder {self.root} is missing (is the volume mounted?)")
        try:
            return self._path(key).is_file()
        except OSError as exc:
            raise StorageError(f"cannot check object {key}: {exc}") from exc

    def delete(self, key: str) -> None:
        """Delete the object's file if present."""
        self._path(key).unlink(missing_ok=True)

    def list_keys(self, prefix: str, older_than: float | None = None) -> list[str]:
        """Return the keys of the files below a folder prefix (a killed put's temporary files included)."""
        folder = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not folder.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in folder.rglob("*")
                      if p.is_file() and (older_than is None or p.stat().st_mtime < older_than))

    def check(self) -> None:
        """Check the folder is writable."""
        probe = self.root / ".readyz"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"image folder {self.root} is not writable: {exc}") from exc


class S3Storage:
    """Objects in an S3-compatible bucket, every call under one retry policy with an overall deadline.

    Reads (the worker's hot path, one per image scored), writes (the web's, one per uploaded image), existence
    checks and deletes go over skinscan.s3http: a URL presigned here by botocore's SigV4 signer and a keep-alive
    `http.client` connection per thread. Every PUT sends Content-MD5 and x-amz-checksum-crc32 as signed headers
    (the server refuses other bytes and keeps the CRC32), every GET checks the bytes against the stored CRC32
    (StorageError if they differ). With no credentials at all the requests go unsigned (a public bucket; refused in
    production, see get_storage). Behind an HTTP proxy, and for listings and bucket checks, boto3 does the request
    (it knows the proxy settings), with its own checksums, its own retries off and the same policy around it.

    The policy (skinscan.s3http.RetryPolicy, SKINSCAN_STORAGE_TIMEOUT_SECONDS and _DEADLINE_SECONDS): a try waits
    at most the timeout for the server, tries are spaced by jittered exponential backoff, and the call gives up
    (StorageError) once the deadline has passed since it began, so a slow server holds a web thread or a worker
    for one deadline, never tries x timeout.
    """

    def __init__(self, bucket: str, endpoint_url: str | None = None, policy: RetryPolicy | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.policy = policy or RetryPolicy()
        config = Config(
            retries={"total_max_attempts": 1},  # tries are the policy's (one deadline for the whole call)
            connect_timeout=self.policy.timeout,
            read_timeout=self.policy.timeout,
            max_pool_connections=32,
            s3={"addressing_style": "path"},
        )
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._credentials = session.get_credentials()
        self._objects = None
        if not _proxied():
            from botocore.httpsession import get_cert_path

            presigner = Presigner(self.client.meta.endpoint_url, self.client.meta.region_name or "us-east-1")
            self._objects = ObjectClient(presigner, self.policy,
                                         ca_file=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True))

    @property
    def signed(self) -> bool:
        """Whether requests are signed (some credentials were found); False: a public bucket, anonymously."""
        return frozen_credentials(self._credentials) is not None

    def _boto(self, what: str, call: Callable[[], T]) -> T:
        """Run a boto3 call under the policy: retried while it fails for a reason worth another try, never
        started with less than one timeout left before the deadline."""
        return self.policy.run(what, lambda _timeout, _end: call(), retryable=_boto_retryable,
                               try_timeout_floor=self.policy.timeout)

    def _target(self, method: str, key: str, content_type: str | None = None,
                headers: dict[str, str] | None = None) -> str:
        """A presigned path and query for one object, signed with the current credentials and these headers."""
        assert self._objects is not None
        credentials = frozen_credentials(self._credentials)
        if credentials is None:
            return self._objects.presigner.path(self.bucket, key)  # anonymous: unsigned
        return self._objects.presigner.presign(method, self.bucket, key, credentials, content_type=content_type,
                                               headers=headers)

    def _object_call(self, doing: str, key: str, call: Callable[[], T]) -> T:
        """Run one call on an object; any failure is a StorageError saying so: "cannot <doing> object <key>: why"."""
        try:
            return call()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - botocore and the socket layer raise many types
            raise StorageError(f"cannot {doing} object {key}: {exc}") from exc

    def _object_request(self, doing: str, key: str, call: Callable[[], Response],
                        answers: tuple[int, ...] = (200,)) -> Response:
        """Run one request on an object (_object_call); an HTTP status outside `answers` is a StorageError too."""
        response = self._object_call(doing, key, call)
        if response.status not in answers:
            raise StorageError(f"cannot {doing} object {key}: HTTP {response.status} {_reason(response)}")
        return response

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Upload bytes to the bucket."""
        if self._objects is None:
            self._object_call("store", key, lambda: self._boto(
                f"PUT {key}", lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data,
                                                             ContentType=content_type)))
            return
        objects = self._objects

        def send() -> Response:
            checksums = put_checksums(data)
            return objects.request("PUT", self._target("PUT", key, content_type, checksums), body=data,
                                   headers={"Content-Type": content_type, **checksums})

        self._object_request("store", key, send)

    def get(self, key: str) -> bytes:
        """Download an object's bytes."""
        if self._objects is None:
            return self._object_call("read", key, lambda: self._boto(
                f"GET {key}", lambda: self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()))
        objects = self._objects
        response = self._object_request("read", key, lambda: objects.request(
            "GET", self._target("GET", key, headers=GET_CHECKSUM), headers=GET_CHECKSUM))
        try:
            if not verify_get(response):
                log.debug("object %s has no stored checksum (written before checksums were sent)", key)
        except ChecksumMismatch as exc:
            raise StorageError(f"object {key} is corrupt: {exc}") from None
        return response.data

    def exists(self, key: str) -> bool:
        """Return whether the object exists (HEAD); StorageError if storage cannot say (unreachable, no bucket)."""
        from botocore.exceptions import ClientError

        try:
            if self._objects is not None:
                response = self._objects.request("HEAD", self._target("HEAD", key))
                if response.status == 200:
                    return True
                if response.status != 404:
                    raise StorageError(f"cannot check object {key}: HTTP {response.status} {response.reason}")
            else:
                self._boto(f"HEAD {key}", lambda: self.client.head_object(Bucket=self.bucket, Key=key))
                return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise StorageError(f"cannot check object {key}: {exc}") from exc
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - connection errors and timeouts are outages, not answers
            raise StorageError(f"cannot check object {key}: {exc}") from exc
        self._check_bucket()  # a HEAD answers 404 alike for a missing object and a missing bucket
        return False

    def _check_bucket(self) -> None:
        """Raise StorageError if the bucket does not exist or cannot be reached."""
        from botocore.exceptions import ClientError

        try:
            self._boto(f"HEAD bucket {self.bucket}", lambda: self.client.head_bucket(Bucket=self.bucket))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"bucket {self.bucket} does not exist") from exc
            raise StorageError(f"bucket {self.bucket} unreachable: {exc}") from exc
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"bucket {self.bucket} unreachable: {exc}") from exc

    def delete(self, key: str) -> None:
        """Delete an object (no error if absent)."""
        if self._objects is None:
            self._object_call("delete", key, lambda: self._boto(
                f"DELETE {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=key)))
            return
        objects = self._objects
        self._object_request("delete", key, lambda: objects.request("DELETE", self._target("DELETE", key)),
                             answers=(200, 204, 404))

    def list_keys(self, prefix: str, older_than: float | None = None) -> list[str]:
        """Return the keys of the bucket's objects that start with prefix (every page of the listing; each page
        one call under the policy)."""
        keys: list[str] = []
        token: str | None = None
        try:
            while True:
                args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
                if token:
                    args["ContinuationToken"] = token
                page = self._boto(f"LIST {prefix}", lambda args=args: self.client.list_objects_v2(**args))
                keys += [o["Key"] for o in page.get("Contents", [])
                         if older_than is None or o["LastModified"].timestamp() < older_than]
                token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
                if not token:
                    return keys
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot list objects under {prefix}: {exc}") from exc

    def check(self) -> None:
        """HEAD the bucket."""
        try:
            self._boto(f"HEAD bucket {self.bucket}", lambda: self.client.head_bucket(Bucket=self.bucket))
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"bucket {self.bucket} unreachable: {exc}") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (for development and tests)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception:  # noqa: BLE001
            self.client.create_bucket(Bucket=self.bucket)


def _boto_retryable(exc: BaseException) -> bool:
    """Whether a boto3 call's error is worth another try: connection errors, timeouts, 5xx and throttling."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or code in ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout")
    return isinstance(exc, (BotoConnectionError, HTTPClientError, OSError))


def _proxied() -> bool:
    """Whether an HTTP proxy is configured (boto3 honours it; the plain pool would not)."""
    return any(os.environ.get(name) for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"))


def _reason(response: Response) -> str:
    """The S3 error code of a failed answer (NoSuchKey, AccessDenied...), else its reason phrase."""
    code = re.search(rb"<Code>([^<]+)</Code>", response.data or b"")
    return code.group(1).decode("ascii", "replace") if code else response.reason


_STORAGES: dict[tuple[str | None, str | None, str], Storage] = {}


def get_storage(settings: Settings | None = None) -> Storage:
    """Return this process's storage: S3 when S3_BUCKET is set, else the local images folder."""
    settings = settings or load_settings()
    key = (settings.s3_bucket, settings.s3_endpoint_url, str(settings.images_dir))
    if key not in _STORAGES:
        if settings.s3_bucket:
            policy = RetryPolicy(timeout=settings.storage_timeout_seconds,
                                 deadline=max(settings.storage_deadline_seconds, settings.storage_timeout_seconds))
            storage = S3Storage(settings.s3_bucket, settings.s3_endpoint_url, policy)
            if settings.production and not storage.signed:
                raise ConfigError("refusing unsigned object storage in production: no S3 credentials found "
                                  "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or an instance role)")
            _STORAGES[key] = storage
        else:
            _STORAGES[key] = LocalStorage(settings.images_dir)
    return _STORAGES[key]
