"""Identifying metadata never reaches storage, wherever it sits in the file: each crafted upload is read back from
the S3 server as an attacker with the bucket would read it (issue 12, point 2)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin
from private_services import make_client
from sqlalchemy import select

from skinscan.db import session_scope
from skinscan.imaging import decode_rgb
from skinscan.tables import ImageRecord

pytestmark = [pytest.mark.services]

SECRET = b"Jane Doe MRN 88231"
NEEDLES = (SECRET, b"Jane", b"88231", b"Exif", b"GPS", b"ICC_PROFILE", b"iCCP", b"tEXt", b"DermaCam",
           b"2023:11:02")


@pytest.fixture(scope="module")
def photo(ham_dir: Path) -> Image.Image:
    """A real HAM10000 lesion as an RGB image."""
    path = sorted((ham_dir / "images").glob("ISIC_*.jpg"))[3000]
    with Image.open(path) as img:
        return img.convert("RGB")


def segment(marker: int, body: bytes) -> bytes:
    """One JPEG marker segment."""
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def gps_exif() -> bytes:
    """An EXIF APP1 body with GPS, date, camera make and the secret."""
    exif = Image.Exif()
    exif[0x0132] = "2023:11:02 14:05:09"
    exif[0x010F] = "DermaCam"
    exif[0x013B] = SECRET.decode()
    exif[0x8825] = {1: "N", 2: (59.0, 19.0, 44.0), 3: "E", 4: (18.0, 4.0, 7.0)}
    return exif.tobytes()


def crafted_files(photo: Image.Image) -> dict[str, bytes]:
    """Uploads that each hide identifying data where a segment-by-segment stripper overlooked it."""
    out = io.BytesIO()
    photo.save(out, "JPEG", quality=90, progressive=True)
    progressive = out.getvalue()
    first_scan = progressive.index(b"\xff\xda")
    second_scan = progressive.index(b"\xff\xda", first_scan + 2)
    between_scans = (progressive[:second_scan] + segment(0xE1, gps_exif())
                     + segment(0xFE, SECRET) + progressive[second_scan:])

    out = io.BytesIO()
    photo.save(out, "JPEG", quality=90)
    baseline = out.getvalue()
    non_jfif_app0 = baseline[:2] + segment(0xE0, b"NOTE\x00" + SECRET) + baseline[2:]
    jfif_thumbnail = (baseline[:2] + segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x06\x01" + SECRET)
                      + baseline[2:])

    out = io.BytesIO()
    photo.save(out, "JPEG", quality=90, icc_profile=b"\x00" * 128 + b"desc " + SECRET)
    icc_jpeg = out.getvalue()

    out = io.BytesIO()
    photo.save(out, "PNG")
    png = out.getvalue()
    iccp = chunk(b"iCCP", SECRET + b"\x00\x00" + zlib.compress(b"\x00" * 128 + b"desc " + SECRET))
    iccp_png = png[:33] + iccp + png[33:]
    after_iend = png + chunk(b"tEXt", b"Author\x00" + SECRET)

    out = io.BytesIO()
    photo.save(out, "BMP")
    bmp_trailer = out.getvalue() + b"\x00" + SECRET

    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[315] = SECRET.decode()
    tags[306] = "2023:11:02 14:05:09"
    out = io.BytesIO()
    photo.save(out, "TIFF", tiffinfo=tags)
    tiff = out.getvalue()
    files = {"progressive-exif-between-scans.jpg": between_scans, "non-jfif-app0.jpg": non_jfif_app0,
             "jfif-thumbnail.jpg": jfif_thumbnail, "icc-app2.jpg": icc_jpeg, "iccp-name.png": iccp_png,
             "text-after-iend.png": after_iend, "bmp-trailer.bmp": bmp_trailer, "tiff-tags.tif": tiff}
    for name, data in files.items():  # every crafted file decodes, and carries the secret
        assert SECRET in data, name
        decode_rgb(data)
    return files


def test_stored_objects_carry_no_identifying_metadata(stack, photo) -> None:  # type: ignore[no-untyped-def]
    """Each crafted file is accepted; the object in the bucket has none of the secret, no EXIF, no ICC, no text,
    nothing after the image, and decodes to exactly the pixels the upload decodes to."""
    from skinscan.storage import S3Storage

    files = crafted_files(photo)
    settings = stack.settings()
    client = make_client(settings)
    resp = client.submit(list(files.items()))
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["accepted"] == len(files), resp.get_json()
    with session_scope(settings) as session:
        rows = dict(session.execute(select(ImageRecord.filename, ImageRecord.storage_key)
                                    .where(ImageRecord.job_id == resp.get_json()["id"])).all())
    s3 = S3Storage(settings.s3_bucket, settings.s3_endpoint_url)
    for name, data in files.items():
        stored = s3.client.get_object(Bucket=settings.s3_bucket, Key=rows[name])["Body"].read()
        for needle in NEEDLES:
            assert needle not in stored, (name, needle)
        with Image.open(io.BytesIO(stored)) as img:
            assert not dict(img.getexif()), name
            assert "icc_profile" not in img.info and "comment" not in img.info, name
            assert img.format in ("JPEG", "PNG"), name
            if img.format == "JPEG":
                assert stored.endswith(b"\xff\xd9") and stored.count(b"\xff\xe1") == 0, name
                app0 = stored.find(b"\xff\xe0")
                assert app0 < 0 or stored[app0 + 2:app0 + 4] == b"\x00\x10", name  # bare JFIF, no thumbnail
            else:
                assert stored.endswith(chunk(b"IEND", b"")), name
        assert np.array_equal(np.asarray(decode_rgb(stored)), np.asarray(decode_rgb(data))), name
