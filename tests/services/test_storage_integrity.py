"""Object integrity on a real S3 server over HTTP: what a PUT stores comes with its CRC32, and a GET refuses bytes
that no longer match it."""

from __future__ import annotations

import uuid

import pytest

from skinscan.s3http import crc32_b64, put_checksums

pytestmark = [pytest.mark.services]


@pytest.fixture()
def storage(moto, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """S3Storage on a fresh bucket of the session's S3 server, with credentials."""
    from skinscan.storage import S3Storage

    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    s3 = S3Storage(f"integrity-{uuid.uuid4().hex[:8]}", moto.url)
    s3.ensure_bucket()
    return s3


def test_put_stores_the_checksum_and_get_verifies_it(storage) -> None:  # type: ignore[no-untyped-def]
    """The server keeps the CRC32 the PUT sent (HEAD with checksum mode shows it) and hands it back with the GET."""
    data = uuid.uuid4().bytes * 5000
    storage.put("clinic/a.jpg", data, "image/jpeg")
    head = storage.client.head_object(Bucket=storage.bucket, Key="clinic/a.jpg", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] == crc32_b64(data)
    assert storage.get("clinic/a.jpg") == data


def test_get_refuses_bytes_that_changed_under_their_checksum(storage) -> None:  # type: ignore[no-untyped-def]
    """An object whose bytes no longer match its stored CRC32 (corrupted at rest or on the way) is refused with
    StorageError naming the object, never scored."""
    from skinscan.storage import StorageError

    data = b"\xff\xd8" + uuid.uuid4().bytes * 100
    changed = data[:-1] + b"\x00"
    stale = {**put_checksums(changed), "x-amz-checksum-crc32": crc32_b64(data)}  # the CRC32 of other bytes
    target = storage._target("PUT", "clinic/b.jpg", "image/jpeg", stale)
    stored = storage._objects.request("PUT", target, body=changed, headers={"Content-Type": "image/jpeg", **stale})
    if stored.status != 200:
        pytest.skip("this S3 server checks the CRC32 of a PUT itself (moto does not): nothing corrupt to read")
    with pytest.raises(StorageError, match=r"clinic/b\.jpg is corrupt"):
        storage.get("clinic/b.jpg")
