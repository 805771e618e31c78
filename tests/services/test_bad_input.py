"""Bad input through the API on real services: each odd file gets a clear error, the rest of the batch is scored.

One job carries every kind of odd file next to real HAM10000 images and is scored by a real worker process;
whole-upload refusals (limits, labels files, nothing acceptable) answer 4xx and keep nothing.
"""

from __future__ import annotations

import io
import struct
import unicodedata
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from private_services import Client, make_client, settings_with
from sqlalchemy import func, select

from skinscan.db import session_scope
from skinscan.tables import ImageRecord, Job, Prediction

pytestmark = [pytest.mark.services]


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    """Encode a Pillow image to bytes."""
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header declares a huge size over a tiny IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_zip(members: dict[str, bytes], compresslevel: int = 6) -> bytes:
    """A zip archive of the given members (names used as is, directories included)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as zf:
        for name, data in members.items():
            if name.endswith("/"):
                zf.writestr(zipfile.ZipInfo(name), b"")
            else:
                zf.writestr(name, data)
    return out.getvalue()


@pytest.fixture(scope="module")
def ham_images(ham_dir: Path) -> list[tuple[str, bytes]]:
    """Twelve real HAM10000 images as (name, bytes)."""
    paths = sorted((ham_dir / "images").glob("ISIC_*.jpg"))[:12]
    return [(p.name, p.read_bytes()) for p in paths]


def stored_objects(stack, prefix: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Keys in the stack's bucket under a prefix."""
    from skinscan.storage import S3Storage

    settings = stack.settings()
    client = S3Storage(settings.s3_bucket, settings.s3_endpoint_url).client
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=settings.s3_bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def assert_nothing_kept(stack, client: Client) -> None:  # type: ignore[no-untyped-def]
    """A refused upload leaves no job, no image row and no stored object for the clinic."""
    with session_scope(client.settings) as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.clinic_id == client.clinic_id)) == 0
        assert session.scalar(select(func.count()).select_from(ImageRecord)
                              .where(ImageRecord.clinic_id == client.clinic_id)) == 0
    assert stored_objects(stack, client.clinic_id + "/") == []


# Expected outcome per file name: ("scored", None, None), ("rejected", status, reason) at upload,
# or ("failed", None, reason) by the worker.
SCORED = ("scored", None, None)


def odd_batch(good: list[tuple[str, bytes]]) -> tuple[list[tuple[str, bytes]], dict[str, list[tuple]]]:
    """The files of the big odd batch and what should become of each (by cleaned file name)."""
    base = Image.open(io.BytesIO(good[0][1])).convert("RGB")
    gray16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    exif[0xA431] = "SERIAL-778899"
    rotated = encode(base.rotate(90, expand=True), "JPEG", quality=95, exif=exif)
    frames = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    long_name = "L" * 296 + ".jpg"
    files: list[tuple[str, bytes]] = [
        *good[:6],
        ("empty.jpg", b""),
        ("truncated.jpg", good[6][1][: len(good[6][1]) // 2]),
        ("random.jpg", bytes(np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8))),
        ("notes.txt", b"this is not an image\n"),
        ("page.html", b"<!doctype html><html><body><img src=x></body></html>"),
        ("deep16.png", encode(Image.fromarray(gray16), "PNG")),
        ("gray.jpg", encode(base.convert("L"), "JPEG")),
        ("cmyk.jpg", encode(base.convert("CMYK"), "JPEG")),
        ("palette.png", encode(palette, "PNG", transparency=0)),
        ("rotated.jpg", rotated),
        ("animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80)),
        ("bomb.png", png_bomb(100_000, 100_000)),
        ("big-dims.png", png_bomb(9_000, 9_000)),
        ("tiny.png", encode(Image.new("RGB", (1, 1), "red"), "PNG")),
        ("pages.tif", encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])),
        ("lesion.webp", encode(base, "WEBP")),
        ("photo.heic", b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 200),
        ("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"></svg>'),
        ("bomb.zip", make_zip({"zeros.jpg": b"\0" * 20_000_000}, compresslevel=9)),
        ("mixed.zip", make_zip({
            "../../etc/evil.jpg": good[7][1], "a/": b"", "a/b/c/nested.jpg": good[8][1], "readme.txt": b"hello",
            "__MACOSX/._nested.jpg": b"junk", ".DS_Store": b"junk", "inner.zip": make_zip({"x.jpg": good[9][1]}),
        })),
        ("broken.zip", b"PK\x03\x04" + b"\x00" * 40 + b"not really a zip"),
        ("dup-a.jpg", good[10][1]),
        ("dup-b.jpg", good[10][1]),
        ("same-name.jpg", good[11][1]),
        ("same-name.jpg", good[1][1]),
        ("läsion-日本-😀.jpg", good[2][1]),
        ("../../../etc/passwd.jpg", good[3][1]),
        (long_name, good[4][1]),
    ]
    expect: dict[str, list[tuple]] = {}

    def add(name: str, outcome: tuple) -> None:
        expect.setdefault(name, []).append(outcome)

    for name, _ in good[:6]:
        add(name, SCORED)
    add("empty.jpg", ("rejected", 400, "empty file"))
    add("truncated.jpg", ("failed", None, "truncated"))
    add("random.jpg", ("rejected", 415, "not a recognised image"))
    add("notes.txt", ("rejected", 415, "not a recognised image"))
    add("page.html", ("rejected", 415, "SVG/HTML"))
    for name in ("deep16.png", "gray.jpg", "cmyk.jpg", "palette.png", "rotated.jpg"):
        add(name, SCORED)
    add("animated.gif", ("rejected", 415, "GIF images are not supported"))
    add("bomb.png", ("rejected", 400, "decompression bomb"))
    add("big-dims.png", ("rejected", 400, "too large"))
    add("tiny.png", ("rejected", 400, "too small"))
    add("pages.tif", ("rejected", 400, "multi-frame TIFF"))
    add("lesion.webp", ("rejected", 415, "WEBP images are not supported"))
    add("photo.heic", ("rejected", 415, "HEIC"))
    add("drawing.svg", ("rejected", 415, "SVG"))
    add("zeros.jpg", ("rejected", 413, "compression ratio"))
    add("evil.jpg", SCORED)
    add("nested.jpg", SCORED)
    add("readme.txt", ("rejected", 415, "not a recognised image"))
    add("inner.zip", ("rejected", 415, "not a recognised image"))
    add("broken.zip", ("rejected", 400, "corrupt or not a zip"))
    add("dup-a.jpg", SCORED)
    add("dup-b.jpg", SCORED)
    add("same-name.jpg", SCORED)
    add("same-name.jpg", SCORED)
    add(unicodedata.normalize("NFC", "läsion-日本-😀.jpg"), SCORED)
    add("passwd.jpg", SCORED)
    add("L" * 247 + "~.jpg", SCORED)  # cut to at most 255 characters, keeping the extension
    return files, expect


def test_odd_batch_each_file_gets_a_clear_outcome(stack, ham_images) -> None:  # type: ignore[no-untyped-def]
    """One job with every odd file and good ones: refusals name their reason, the rest is scored exactly once."""
    files, expect = odd_batch(ham_images)
    settings = stack.settings()
    client = make_client(settings)
    stack.worker()
    resp = client.submit(files)
    assert resp.status_code == 202, resp.get_json()
    body = resp.get_json()
    n_rows = sum(len(v) for v in expect.values())
    rejected = [e for v in expect.values() for e in v if e[0] == "rejected"]
    assert body["accepted"] == n_rows - len(rejected)
    assert len(body["rejected"]) == len(rejected)
    for r in body["rejected"]:
        outcomes = expect[r["filename"]]
        assert any(o[0] == "rejected" and o[1] == r["status"] and o[2] in r["error"] for o in outcomes), r

    job = client.wait(body["id"], timeout=600)
    scored = sum(1 for v in expect.values() for e in v if e == SCORED)
    assert job["status"] == "done"
    assert job["counts"] == {"total": n_rows - len(rejected), "scored": scored,
                             "failed": n_rows - len(rejected) - scored, "refused": len(rejected)}

    results = client.get(f"/api/v1/jobs/{body['id']}/results").get_json()["results"]
    assert len(results) == n_rows
    seen: dict[str, int] = {}
    for row in results:
        name = row["filename"]
        expected = expect[name][seen.get(name, 0)]
        seen[name] = seen.get(name, 0) + 1
        if expected == SCORED:
            assert row["status"] == "scored" and row["probabilities"] and row["error"] is None, row
        else:
            assert row["status"] == "failed" and expected[2] in row["error"], (row, expected)
            assert row["probabilities"] is None
    assert seen == {k: len(v) for k, v in expect.items()}

    by_name = {r["filename"]: r for r in results}
    assert by_name["dup-a.jpg"]["image_id"] != by_name["dup-b.jpg"]["image_id"]
    assert by_name["dup-a.jpg"]["probabilities"] == by_name["dup-b.jpg"]["probabilities"]

    with session_scope(settings) as session:
        per_image = dict(session.execute(
            select(ImageRecord.id, func.count(Prediction.id))
                .outerjoin(Prediction, Prediction.image_id == ImageRecord.id)
            .where(ImageRecord.job_id == body["id"]).group_by(ImageRecord.id)).all())
        statuses = dict(session.execute(select(ImageRecord.id, ImageRecord.status)
                                        .where(ImageRecord.job_id == body["id"])).all())
        keys = dict(session.execute(select(ImageRecord.filename, ImageRecord.storage_key)
                                    .where(ImageRecord.job_id == body["id"])).all())
    assert all(per_image[i] == (1 if s == "scored" else 0) for i, s in statuses.items())
    assert all(k is None or (".." not in k and "passwd" not in k and "evil" not in k) for k in keys.values())

    # The EXIF-rotated JPEG was stored upright (and without its EXIF): compare with the upright original.
    from skinscan.storage import get_storage

    stored = get_storage(settings).get(keys["rotated.jpg"])
    with Image.open(io.BytesIO(stored)) as img:
        assert not dict(img.getexif()) and b"SERIAL-778899" not in stored
        upright = np.asarray(img.convert("RGB"), dtype=np.int16)
    original = np.asarray(Image.open(io.BytesIO(ham_images[0][1])).convert("RGB"), dtype=np.int16)
    assert upright.shape == original.shape == (150, 200, 3)
    assert np.abs(upright - original).mean() < 6


def test_unsupported_types_alone_answer_415(stack) -> None:  # type: ignore[no-untyped-def]
    """An upload of only HEIC and SVG files is refused as a whole with 415, naming each file."""
    client = make_client(stack.settings())
    resp = client.submit([("photo.heic", b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64),
                          ("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>')])
    assert resp.status_code == 415
    body = resp.get_json()
    assert body["status"] == 415 and {d["filename"] for d in body["details"]} == {"photo.heic", "drawing.svg"}
    assert all(d["status"] == 415 for d in body["details"])
    empty = client.submit([])
    assert empty.status_code == 400 and "no files" in empty.get_json()["error"]
    assert_nothing_kept(stack, client)


LABEL_CASES = [
    ("wrong columns", b"name,diagnosis\nISIC_0024306,mel\n", 1, "unrecognised columns"),
    ("invalid diagnosis", b"lesion_id,image_id,dx\nHAM_1,ISIC_0024306,mel\nHAM_2,ISIC_0024307,cancer\n", 3,
     "unknown diagnosis 'cancer'"),
    ("invalid flag", b"image_id,melanoma,seborrheic_keratosis\nISIC_0024306,2,0\n", 2, "must be 0 or 1"),
    ("two classes", b"image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_0024306,1,1,0,0,0,0,0\n", 2, "exactly one"),
    ("short row", b"lesion_id,image_id,dx\nHAM_1,ISIC_0024306\n", 2, "expected 3 columns"),
    ("listed twice", b"lesion_id,image_id,dx\nH1,ISIC_0024306,mel\nH2,ISIC_0024306,nv\n", 3, "listed twice"),
    ("not utf-8", b"image_id,dx\n\xff\xfe\xfa,mel\n", None, "not UTF-8"),
]


@pytest.mark.parametrize(("labels", "line", "reason"), [c[1:] for c in LABEL_CASES], ids=[c[0] for c in LABEL_CASES])
def test_bad_labels_file_answers_400_naming_the_line(stack, ham_images, labels, line, reason) -> None:  # type: ignore[no-untyped-def]
    """A labels CSV with wrong columns or invalid values is refused: 400, the line and why (rows for images not in
    the upload are not an error: tests/fast/test_labels_matching_fast.py)."""
    client = make_client(stack.settings())
    resp = client.submit(ham_images[:2], labels)
    assert resp.status_code == 400, resp.get_json()
    body = resp.get_json()
    assert reason in body["error"] and body["status"] == 400
    if line is not None:
        assert f"line {line}" in body["error"]
        assert body["details"][0]["line"] == line
    assert_nothing_kept(stack, client)


def test_upload_limits_are_configurable_and_answer_413(stack, ham_images) -> None:  # type: ignore[no-untyped-def]
    """SKINSCAN_MAX_FILES, SKINSCAN_MAX_FILE_BYTES and SKINSCAN_MAX_UPLOAD_BYTES refuse with 413 and keep nothing."""
    small = max(len(b) for _, b in ham_images[:3])
    settings = settings_with(stack, SKINSCAN_MAX_FILES="3", SKINSCAN_MAX_FILE_BYTES=str(small),
                             SKINSCAN_MAX_UPLOAD_BYTES=str(small * 8))
    assert (settings.max_files, settings.max_file_bytes, settings.max_upload_bytes) == (3, small, small * 8)
    client = make_client(settings)

    too_many = client.submit(ham_images[:4])
    assert too_many.status_code == 413 and "more than 3 files" in too_many.get_json()["error"]
    assert_nothing_kept(stack, client)

    in_zip = client.submit([("four.zip", make_zip(dict(ham_images[:4])))])
    assert in_zip.status_code == 413 and "more than 3 files" in in_zip.get_json()["error"]
    assert_nothing_kept(stack, client)

    too_big_request = client.submit(ham_images[:2] + [("big.jpg", b"\xff\xd8" + b"\0" * (small * 8))])
    assert too_big_request.status_code == 413
    assert f"{small * 8:,}" in too_big_request.get_json()["error"]
    assert_nothing_kept(stack, client)

    big = ("big.jpg", ham_images[0][1] + b"\0" * (small + 1 - len(ham_images[0][1])))
    only_big = client.submit([big])
    assert only_big.status_code == 413 and only_big.get_json()["details"][0]["filename"] == "big.jpg"
    assert_nothing_kept(stack, client)

    expands = client.submit([("expands.zip", make_zip({"a.jpg": b"\0" * (small * 9)}, compresslevel=9))])
    assert expands.status_code == 413 and "expands to" in expands.get_json()["details"][0]["error"]
    assert_nothing_kept(stack, client)

    mixed = client.submit(ham_images[:2] + [big])
    assert mixed.status_code == 202
    body = mixed.get_json()
    assert body["accepted"] == 2 and body["rejected"][0]["status"] == 413
    assert "over the limit" in body["rejected"][0]["error"]
