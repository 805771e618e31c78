"""The S3 object client: signatures byte-identical to botocore's SigV4 presigner, retries over a real socket."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
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
                                        content_type: str | None) -> None:
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    region = "eu-west-1"
    expected = urlsplit(_botocore_url(endpoint, region, creds, method, key, content_type))
    when = datetime.strptime(parse_qs(expected.query)["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    presigner = Presigner(endpoint, region)
    ours = urlsplit(presigner.presign(method, "skin-bucket", key, creds, content_type=content_type, now=when))
    assert ours.path == expected.path
    assert parse_qs(ours.query) == parse_qs(expected.query)  # the signature included


def test_signing_key_follows_the_day_and_the_secret() -> None:
    presigner = Presigner("http://127.0.0.1:9000", "us-east-1")
    one, two = Credentials("AK", "secret-1"), Credentials("AK", "secret-2")
    day1, day2 = datetime(2026, 11, 27, 23, 59, tzinfo=UTC), datetime(2026, 11, 28, 0, 1, tzinfo=UTC)
    urls = {presigner.presign("GET", "b", "k", c, now=d) for c in (one, two) for d in (day1, day2)}
    assert len({parse_qs(urlsplit(u).query)["X-Amz-Signature"][0] for u in urls}) == 4


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
