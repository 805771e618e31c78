"""The S3 object client: URLs as botocore's own presigner makes them, checksums on every PUT and checked on every
GET, retries over a real socket."""

from __future__ import annotations

import base64
import hashlib
import threading
import zlib
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.config import Config

from skinscan.s3http import Credentials, ObjectClient, Presigner, RetryPolicy

KEYS = ["clinic/job/0001.jpg", "a b/c+d~e=f&g.jpg", "unicodé/ñ.png", "x/y//z.tif"]


def _botocore_url(endpoint: str, region: str, creds: Credentials, method: str, key: str,
                  content_type: str | None) -> str:
    client = boto3.client("s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=creds.access_key,
                          aws_secret_access_key=creds.secret_key, aws_session_token=creds.token,
                          config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
    params = {"Bucket": "skin-bucket", "Key": key}
    if content_type:
        params["ContentType"] = content_type
    return client.generate_presigned_url("get_object" if method == "GET" else "put_object", Params=params,
                                         ExpiresIn=300)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "https://s3.eu-west-1.amazonaws.com",
                                      "http://minio:80", "https://storage.example.org:8443"])
@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzE//session+token="])
@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize(("method", "content_type"), [("GET", None), ("PUT", "image/jpeg")])
def test_presigned_url_matches_botocore(endpoint: str, token: str | None, key: str, method: str,
                                        content_type: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The object URL (bucket and key encoding, path style) is the one boto3's generate_presigned_url makes."""
    import botocore.auth

    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    region = "eu-west-1"
    expected = urlsplit(_botocore_url(endpoint, region, creds, method, key, content_type))
    when = datetime.strptime(parse_qs(expected.query)["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: when)
    presigner = Presigner(endpoint, region)
    ours = urlsplit(presigner.presign(method, "skin-bucket", key, creds, expires=300, content_type=content_type))
    assert ours.path == expected.path
    assert parse_qs(ours.query) == parse_qs(expected.query)  # the signature included


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first `fail` requests, then echoes; closes the connection after every `close_every`."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, bytes]] = []
    fail = 0
    close_every = 0

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append((self.command, self.headers["Host"], body))
        if type(self).fail > 0:
            type(self).fail -= 1
            status, data = 503, b"<Error><Code>SlowDown</Code></Error>"
        else:
            status, data = 200, body or b"object-bytes"
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if type(self).close_every and len(type(self).seen) % type(self).close_every == 0:
            self.close_connection = True  # no "Connection: close": the client finds out on its next request

    do_GET = do_PUT = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server():
    _Flaky.seen, _Flaky.fail, _Flaky.close_every = [], 0, 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _client(httpd: ThreadingHTTPServer, retries: int = 4) -> ObjectClient:
    return ObjectClient(Presigner(f"http://127.0.0.1:{httpd.server_port}", "us-east-1"),
                        RetryPolicy(tries=retries + 1, backoff=0.01))


def test_busy_server_is_tried_again(server: ThreadingHTTPServer) -> None:
    _Flaky.fail = 2
    response = _client(server).request("PUT", "/b/k?sig", body=b"jpeg-bytes", headers={"Content-Type": "image/jpeg"})
    assert (response.status, response.data) == (200, b"jpeg-bytes")
    assert [s[2] for s in _Flaky.seen] == [b"jpeg-bytes"] * 3
    assert {s[1] for s in _Flaky.seen} == {f"127.0.0.1:{server.server_port}"}


def test_gives_up_after_its_retries(server: ThreadingHTTPServer) -> None:
    _Flaky.fail = 10
    response = _client(server, retries=2).request("GET", "/b/k?sig")
    assert response.status == 503 and b"SlowDown" in response.data
    assert len(_Flaky.seen) == 3


def test_connection_closed_while_idle_is_reopened(server: ThreadingHTTPServer) -> None:
    _Flaky.close_every = 2
    client = _client(server, retries=0)  # a stale keep-alive connection is not a retry
    assert [client.request("GET", f"/b/{i}?sig").status for i in range(7)] == [200] * 7
    assert len(_Flaky.seen) == 7


def test_unreachable_server_raises() -> None:
    client = ObjectClient(Presigner("http://127.0.0.1:9", "us-east-1"), RetryPolicy(tries=2, backoff=0.01))
    with pytest.raises(OSError):
        client.request("GET", "/b/k?sig")


def test_storage_without_credentials_sends_unsigned_requests(server: ThreadingHTTPServer,
                                                             monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No credentials anywhere (a public bucket): plain object URLs, as boto3's presigner makes them then."""
    from skinscan.storage import S3Storage

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    requests = []

    class Recorder(_Flaky):
        def _answer(self) -> None:
            requests.append((self.command, self.path))
            super()._answer()

        do_GET = do_PUT = _answer

    server.RequestHandlerClass = Recorder
    storage = S3Storage("public-bucket", f"http://127.0.0.1:{server.server_port}")
    storage.put("a b/1.jpg", b"jpeg", "image/jpeg")
    assert storage.get("x/2.jpg") == b"object-bytes"
    assert requests == [("PUT", "/public-bucket/a%20b/1.jpg"), ("GET", "/public-bucket/x/2.jpg")]


def test_a_forked_child_opens_its_own_connection(server: ThreadingHTTPServer) -> None:
    """A pool process forked after the parent used the client must not write on the parent's socket."""
    import os

    client = _client(server)
    assert client.request("GET", "/b/parent?sig").status == 200
    parent = client._connection()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own connection, and it works
        try:
            ok = client._connection() is not parent and client.request("GET", "/b/child?sig").status == 200
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert client._connection() is parent and client.request("GET", "/b/again?sig").status == 200


class _Checksummed(BaseHTTPRequestHandler):
    """A one-object S3 stand-in: keeps what a PUT sends with its headers; a GET answers the bytes with the stored
    x-amz-checksum-crc32 when asked for it (`stored` replaces the kept checksum, as a corrupted object would)."""

    protocol_version = "HTTP/1.1"
    puts: list[tuple[dict[str, str], str, bytes]] = []
    gets: list[dict[str, str]] = []
    body = b""
    stored: str | None = None

    def do_PUT(self) -> None:  # noqa: N802 - http.server's name
        cls = type(self)
        cls.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        cls.puts.append(({k.lower(): v for k, v in self.headers.items()}, self.path, cls.body))
        cls.stored = self.headers.get("x-amz-checksum-crc32")
        self._reply(b"")

    def do_GET(self) -> None:  # noqa: N802
        cls = type(self)
        cls.gets.append({k.lower(): v for k, v in self.headers.items()})
        extra = {"x-amz-checksum-crc32": cls.stored} if cls.stored and self.headers.get(
            "x-amz-checksum-mode") == "ENABLED" else {}
        self._reply(cls.body, extra)

    def _reply(self, data: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(200)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def checksummed(monkeypatch: pytest.MonkeyPatch):
    """An S3Storage with credentials on the one-object stand-in."""
    from skinscan.storage import S3Storage

    _Checksummed.puts, _Checksummed.gets, _Checksummed.body, _Checksummed.stored = [], [], b"", None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Checksummed)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    for name, value in (("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"), ("AWS_SECRET_ACCESS_KEY", "a-secret"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    yield S3Storage("bucket", f"http://127.0.0.1:{httpd.server_port}")
    httpd.shutdown()
    httpd.server_close()


def test_every_put_carries_signed_checksums(checksummed) -> None:  # type: ignore[no-untyped-def]
    """Content-MD5 and x-amz-checksum-crc32 of the very bytes sent, both among the URL's signed headers (a
    replayed URL or a changed body cannot store other bytes); the URL lives a minute."""
    data = bytes(range(256)) * 40
    checksummed.put("clinic/1.jpg", data, "image/jpeg")
    headers, path, body = _Checksummed.puts[0]
    assert body == data
    assert headers["content-md5"] == base64.b64encode(hashlib.md5(data).digest()).decode()
    assert headers["x-amz-checksum-crc32"] == base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    query = parse_qs(urlsplit(path).query)
    signed = query["X-Amz-SignedHeaders"][0].split(";")
    assert {"content-md5", "x-amz-checksum-crc32", "content-type", "host"} <= set(signed)
    assert query["X-Amz-Expires"] == ["60"]


def test_get_checks_the_stored_checksum(checksummed) -> None:  # type: ignore[no-untyped-def]
    """A GET asks for the stored CRC32 and refuses bytes that do not match it; an object stored without one (before
    checksums) is read as it is."""
    from skinscan.storage import StorageError

    data = b"\xff\xd8 lesion pixels" * 100
    checksummed.put("k.jpg", data, "image/jpeg")
    assert checksummed.get("k.jpg") == data
    assert _Checksummed.gets[-1]["x-amz-checksum-mode"] == "ENABLED"
    _Checksummed.body = data[:-1] + b"!"  # the stored bytes changed under their checksum
    with pytest.raises(StorageError, match="corrupt.*CRC32"):
        checksummed.get("k.jpg")
    _Checksummed.stored = None  # an object written before checksums were sent
    assert checksummed.get("k.jpg") == data[:-1] + b"!"


def test_production_refuses_unsigned_storage(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No S3 credentials anywhere: development reads a public bucket anonymously, production refuses to."""
    from tests_helpers import replace

    from skinscan.settings import ConfigError, load_settings
    from skinscan.storage import get_storage

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr("skinscan.storage._STORAGES", {})
    settings = replace(load_settings(), s3_bucket="public-bucket", s3_endpoint_url="http://127.0.0.1:9")
    assert not get_storage(settings).signed
    monkeypatch.setattr("skinscan.storage._STORAGES", {})
    with pytest.raises(ConfigError, match="unsigned object storage in production"):
        get_storage(replace(settings, production=True))
