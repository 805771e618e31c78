"""Client CPU per object of SkinScan's S3 storage (PUT as the web does, GET as the worker does).

    .venv/bin/python benchmarks/s3_client.py [--objects 400] [--size 150000]

Against moto under gunicorn (keep-alive, like S3 and MinIO) on a free port; only this process's CPU time
(time.process_time) is counted, the server's is not. Run it from two checkouts (PYTHONPATH) to compare versions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path


def _measure(storage: object, keys: list[str], data: bytes, rounds: int) -> dict[str, float]:
    put_ms, get_ms = [], []
    for _ in range(rounds):
        start = time.process_time()
        for key in keys:
            storage.put(key, data, "image/jpeg")  # type: ignore[attr-defined]
        put_ms.append((time.process_time() - start) * 1000 / len(keys))
        start = time.process_time()
        for key in keys:
            storage.get(key)  # type: ignore[attr-defined]
        get_ms.append((time.process_time() - start) * 1000 / len(keys))
    return {"put_ms": statistics.median(put_ms), "get_ms": statistics.median(get_ms),
            "put_range": [min(put_ms), max(put_ms)], "get_range": [min(get_ms), max(get_ms)]}


def main() -> None:
    """Start the S3 server, store and read the objects, print the client CPU per object as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=400)
    parser.add_argument("--size", type=int, default=8_000,
                        help="bytes per object (8 kB: the ISIC 2017 test JPEGs the throughput runs use)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from benchmarks.services import KeepAliveS3

    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench-secret"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ[name] = value
    with tempfile.TemporaryDirectory() as tmp:
        server = KeepAliveS3(Path(tmp))
        try:
            from skinscan.storage import S3Storage

            storage = S3Storage(f"bench-{uuid.uuid4().hex[:8]}", server.url)
            storage.ensure_bucket()
            data = os.urandom(args.size)
            keys = [f"clinic/job/{i:05d}.jpg" for i in range(args.objects)]
            _measure(storage, keys[:50], data, 1)  # warm: connections, imports
            result = _measure(storage, keys, data, args.rounds)
        finally:
            server.close()
    import skinscan.s3http

    summary = {"code": str(Path(skinscan.s3http.__file__).resolve().parents[1]), "size": args.size,
               "objects": args.objects, **result}
    print(json.dumps(summary))  # noqa: T201 - the benchmark's result


if __name__ == "__main__":
    main()
