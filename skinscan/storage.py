"""Image storage behind one interface: an S3-compatible bucket (AWS, MinIO) or a local folder."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Protocol

from skinscan.settings import Settings, load_settings

log = logging.getLogger(__name__)


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
    """Objects in an S3-compatible bucket through boto3, with retries and timeouts.

    Reads (the worker's hot path) and writes (the web's, one per uploaded image) go over a plain urllib3
    connection pool with a presigned URL: half the client CPU of boto3's get_object per object (0.8 against 1.5 ms
    measured on the 2-core VM), and put_object's event hooks and signing showed as 42% of the web's CPU in a
    py-spy profile of an upload. Behind an HTTP proxy, boto3 does both (it knows the proxy settings).
    """

    def __init__(self, bucket: str, endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        config = Config(
            retries={"max_attempts": 8, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=32,
            s3={"addressing_style": "path"},
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self._http = None if _proxied() else _http_pool()

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Upload bytes to the bucket."""
        try:
            if self._http is None:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
                return
            url = self.client.generate_presigned_url(
                "put_object", Params={"Bucket": self.bucket, "Key": key, "ContentType": content_type}, ExpiresIn=300)
            response = self._http.request("PUT", url, body=data, headers={"Content-Type": content_type})
        except Exception as exc:  # noqa: BLE001 - botocore and urllib3 raise many types
            raise StorageError(f"cannot store object {key}: {exc}") from exc
        if response.status != 200:
            code = re.search(rb"<Code>([^<]+)</Code>", response.data or b"")
            reason = code.group(1).decode("ascii", "replace") if code else response.reason
            raise StorageError(f"cannot store object {key}: HTTP {response.status} {reason}")

    def get(self, key: str) -> bytes:
        """Download an object's bytes."""
        try:
            if self._http is None:
                return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            url = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=300)
            response = self._http.request("GET", url)
        except Exception as exc:  # noqa: BLE001 - botocore and urllib3 raise many types
            raise StorageError(f"cannot read object {key}: {exc}") from exc
        if response.status != 200:
            code = re.search(rb"<Code>([^<]+)</Code>", response.data or b"")
            reason = code.group(1).decode("ascii", "replace") if code else response.reason
            raise StorageError(f"cannot read object {key}: HTTP {response.status} {reason}")
        return response.data

    def exists(self, key: str) -> bool:
        """Return whether the object exists (HEAD); StorageError if storage cannot say (unreachable, no bucket)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise StorageError(f"cannot check object {key}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - connection errors and timeouts are outages, not answers
            raise StorageError(f"cannot check object {key}: {exc}") from exc
        self._check_bucket()  # a HEAD answers 404 alike for a missing object and a missing bucket
        return False

    def _check_bucket(self) -> None:
        """Raise StorageError if the bucket does not exist or cannot be reached."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"bucket {self.bucket} does not exist") from exc
            raise StorageError(f"bucket {self.bucket} unreachable: {exc}") from exc
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"bucket {self.bucket} unreachable: {exc}") from exc

    def delete(self, key: str) -> None:
        """Delete an object (no error if absent)."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot delete object {key}: {exc}") from exc

    def list_keys(self, prefix: str, older_than: float | None = None) -> list[str]:
        """Return the keys of the bucket's objects that start with prefix (every page of the listing)."""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return [o["Key"] for page in pages for o in page.get("Contents", [])
                    if older_than is None or o["LastModified"].timestamp() < older_than]
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot list objects under {prefix}: {exc}") from exc

    def check(self) -> None:
        """HEAD the bucket."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"bucket {self.bucket} unreachable: {exc}") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (for development and tests)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception:  # noqa: BLE001
            self.client.create_bucket(Bucket=self.bucket)


def _proxied() -> bool:
    """Whether an HTTP proxy is configured (boto3 honours it; the plain pool would not)."""
    return any(os.environ.get(name) for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"))


def _http_pool() -> Any:
    """A urllib3 pool for presigned reads and writes: boto3's CA bundle, timeouts, retries on connection errors and
    5xx (a PUT of the same bytes to the same key is safe to repeat)."""
    import urllib3
    from botocore.httpsession import get_cert_path

    retries = urllib3.Retry(total=4, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504),
                            allowed_methods=("GET", "PUT"), raise_on_status=False)
    return urllib3.PoolManager(
        maxsize=32, retries=retries, timeout=urllib3.Timeout(connect=5, read=30),
        ca_certs=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True),
    )


_STORAGES: dict[tuple[str | None, str | None, str], Storage] = {}


def get_storage(settings: Settings | None = None) -> Storage:
    """Return this process's storage: S3 when S3_BUCKET is set, else the local images folder."""
    settings = settings or load_settings()
    key = (settings.s3_bucket, settings.s3_endpoint_url, str(settings.images_dir))
    if key not in _STORAGES:
        if settings.s3_bucket:
            _STORAGES[key] = S3Storage(settings.s3_bucket, settings.s3_endpoint_url)
        else:
            _STORAGES[key] = LocalStorage(settings.images_dir)
    return _STORAGES[key]
