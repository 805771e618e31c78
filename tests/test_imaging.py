"""skinscan.imaging on odd inputs: what is refused and why, what is scored, and metadata that never gets stored."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin, TiffImagePlugin
from tests_helpers import sixteen_bit_png

from skinscan.imaging import MAX_HIGH_DEPTH_PIXELS, MAX_PIXELS, ImageError, decode_rgb, sniff_format, strip_metadata

SERIAL = "CAM-SERIAL-5551234"
ARTIST = "Dr Jane Example"
GPS_IFD = 0x8825


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    """Encode a Pillow image to bytes."""
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def lesion(size: tuple[int, int] = (48, 32)) -> Image.Image:
    """A small RGB test picture with structure (a gradient and a dark blob)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 128)], -1)
    arr[(x - w // 2) ** 2 + (y - h // 2) ** 2 < (min(w, h) // 4) ** 2] = (40, 20, 10)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares the given size, with a tiny IDAT (a decompression-bomb shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def jpeg_with_identifying_metadata(orientation: int = 1, img: Image.Image | None = None) -> bytes:
    """A JPEG carrying EXIF (GPS, date, camera serial, artist), XMP and a comment."""
    exif = Image.Exif()
    exif[0x0132] = "2024:05:17 09:41:00"  # DateTime
    exif[0xA431] = SERIAL  # BodySerialNumber
    exif[0x013B] = ARTIST
    exif[0x0112] = orientation
    exif[GPS_IFD] = {1: "N", 2: (52.0, 22.0, 13.5), 3: "E", 4: (4.0, 53.0, 29.0)}
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b"<rdf:Description>patient Jane Example</rdf:Description></rdf:RDF></x:xmpmeta>")
    return encode(img or lesion(), "JPEG", quality=92, exif=exif, comment=b"patient 12345 Jane Example",
                  xmp=xmp)


def assert_no_identifying_metadata(data: bytes) -> None:
    """No EXIF, GPS, XMP, comment, text chunk or identifying string is left in stored bytes."""
    for needle in (b"Exif", b"GPS", SERIAL.encode(), ARTIST.encode(), b"Jane", b"12345", b"xmpmeta",
                   b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"tIME", b"2024:05:17"):
        assert needle not in data, needle
    with Image.open(io.BytesIO(data)) as img:
        assert not dict(img.getexif())
        assert "comment" not in img.info and "xmp" not in img.info


# --- refused -------------------------------------------------------------------------------------------------

REFUSED: list[tuple[str, bytes, str, bool]] = [
    ("zero bytes", b"", "empty file", False),
    ("random bytes", bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)), "not a recognised",
     True),
    ("plain text", b"image_id,dx\nISIC_0000001,mel\n", "not a recognised", True),
    ("html", b"  <!DOCTYPE html><html><body>hi</body></html>", "SVG/HTML", True),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG/HTML", True),
    ("xml-svg", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "SVG/HTML", True),
    ("heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, "HEIC", True),
    ("avif", b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1" + b"\x00" * 64, "HEIC/AVIF", True),
    ("gif", encode(lesion(), "GIF"), "GIF images are not supported", True),
    ("webp", encode(lesion(), "WEBP"), "WEBP images are not supported", True),
    ("1x1", encode(Image.new("RGB", (1, 1), "red"), "PNG"), "too small", False),
    ("7 px wide", encode(Image.new("RGB", (7, 400), "red"), "JPEG"), "too small", False),
    ("bomb over Pillow's limit", png_header_only(100_000, 100_000), "decompression bomb", False),
    ("bomb over SkinScan's limit", png_header_only(8_000, 8_000), "too large", False),
]


@pytest.mark.parametrize(("data", "reason", "unsupported"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_with_a_reason(data: bytes, reason: str, unsupported: bool) -> None:
    """Each odd file is refused by the header check with a reason in words; unsupported types are marked 415."""
    with pytest.raises(ImageError) as err:
        sniff_format(data)
    assert reason in str(err.value)
    assert err.value.unsupported is unsupported
    with pytest.raises(ImageError):
        decode_rgb(data)


def test_animated_and_multi_page_files_are_refused() -> None:
    """An animated GIF (unsupported type), an animated PNG and a multi-page TIFF (one image per file) are refused."""
    frames = [lesion(), lesion().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.raises(ImageError, match="GIF images are not supported") as err:
        sniff_format(gif)
    assert err.value.unsupported
    apng = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    tiff = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    for data, fmt in ((apng, "PNG"), (tiff, "TIFF")):
        with pytest.raises(ImageError, match=f"multi-frame {fmt} \\(2 frames\\)"):
            sniff_format(data)
        with pytest.raises(ImageError, match="multi-frame"):
            strip_metadata(data)


def test_truncated_jpeg_passes_the_header_check_and_fails_decoding() -> None:
    """A truncated JPEG has a valid header; decoding it says it is truncated (the worker records that reason)."""
    data = encode(lesion((256, 192)), "JPEG", quality=90)
    cut = data[: len(data) // 2]
    assert sniff_format(cut) == "JPEG"
    with pytest.raises(ImageError, match="corrupt or truncated JPEG"):
        decode_rgb(cut)


def test_limits_are_exact() -> None:
    """The pixel limit is inclusive: MAX_PIXELS passes the header check, one more row does not."""
    side = int(MAX_PIXELS ** 0.5)
    assert sniff_format(png_header_only(side, side)) == "PNG"
    with pytest.raises(ImageError, match="too large"):
        sniff_format(png_header_only(side, MAX_PIXELS // side + 1))
    assert sniff_format(encode(Image.new("RGB", (8, 8)), "PNG")) == "PNG"


# --- decoded to upright 8-bit RGB ----------------------------------------------------------------------------

def test_sixteen_bit_png_is_scaled_to_eight_bits() -> None:
    """A 16-bit greyscale PNG decodes to RGB with the full range mapped to 0..255."""
    arr = np.array([[0, 65535, 32768, 1000]] * 8, dtype=np.uint16)
    arr = np.repeat(arr, 4, axis=1)
    data = encode(Image.fromarray(arr), "PNG")
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode.startswith("I")
    rgb = np.asarray(decode_rgb(data))
    assert rgb.shape == (8, 16, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 4].tolist() == [255, 255, 255]
    assert abs(int(rgb[0, 8, 0]) - 128) <= 1 and abs(int(rgb[0, 12, 0]) - 4) <= 1


def test_grayscale_cmyk_and_palette_decode_to_rgb() -> None:
    """Greyscale, CMYK JPEG and palette PNG with transparency all decode to RGB with the right colours."""
    gray = np.asarray(decode_rgb(encode(Image.new("L", (16, 16), 90), "JPEG", quality=100)))
    assert gray.shape == (16, 16, 3) and np.all(np.abs(gray.astype(int) - 90) <= 2)

    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = encode(cmyk, "JPEG", quality=100)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "CMYK"
    red = np.asarray(decode_rgb(data))
    assert red.shape == (16, 16, 3) and red[8, 8, 0] > 200 and red[8, 8, 1] < 60 and red[8, 8, 2] < 60

    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([255, 255, 255, 0, 200, 0] + [0] * 762)
    pal.paste(0, (0, 0, 8, 16))  # left half index 0, which is transparent
    data = encode(pal, "PNG", transparency=0)
    out = np.asarray(decode_rgb(data))
    assert out[4, 2].tolist() == [0, 0, 0]  # transparent composited on black
    assert out[4, 12].tolist() == [0, 200, 0]


def test_exif_rotated_jpeg_decodes_and_is_stored_upright() -> None:
    """A JPEG whose EXIF says 'rotate 90 degrees' decodes upright, and the stored copy is upright with no EXIF."""
    upright = Image.new("RGB", (40, 80), (220, 20, 20))
    upright.paste((20, 20, 220), (0, 40, 40, 80))  # top red, bottom blue when shown correctly
    stored_on_sensor = upright.rotate(90, expand=True)  # 80x40 as the camera wrote it
    data = jpeg_with_identifying_metadata(orientation=6, img=stored_on_sensor)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.size == (80, 40) and raw.getexif()[0x0112] == 6

    for img in (decode_rgb(data), decode_rgb(strip_metadata(data)[0])):
        arr = np.asarray(img)
        assert img.size == (40, 80)
        assert arr[10, 20, 0] > 180 and arr[10, 20, 2] < 80  # top is red
        assert arr[70, 20, 2] > 180 and arr[70, 20, 0] < 80  # bottom is blue
    stripped, fmt = strip_metadata(data)
    assert fmt == "JPEG"
    assert_no_identifying_metadata(stripped)


def test_multi_picture_jpeg_is_a_jpeg_and_keeps_only_the_first_picture() -> None:
    """An MPO (camera multi-picture JPEG) counts as JPEG; the stored copy is the first picture alone."""
    first, second = lesion(), Image.new("RGB", (48, 32), "blue")
    exif = Image.Exif()
    exif[0xA431] = SERIAL
    data = encode(first, "MPO", save_all=True, append_images=[second], exif=exif)
    assert sniff_format(data) == "JPEG"
    stripped, fmt = strip_metadata(data)
    assert fmt == "JPEG" and SERIAL.encode() not in stripped and stripped.count(b"\xff\xd9") == 1
    with Image.open(io.BytesIO(stripped)) as img:
        assert img.format == "JPEG"
    assert np.array_equal(np.asarray(decode_rgb(stripped)), np.asarray(decode_rgb(data)))


# --- identifying metadata removed, pixels untouched ----------------------------------------------------------

def test_jpeg_metadata_removed_losslessly() -> None:
    """EXIF (GPS, date, serial), XMP, comments, the ICC profile (free text: device, description) and trailing
    data go; the pixels stay."""
    icc = b"\x00" * 128 + ARTIST.encode()  # a profile's text tags can name anything
    base = jpeg_with_identifying_metadata()
    with_icc = encode(Image.open(io.BytesIO(base)), "JPEG", quality=92, icc_profile=icc,
                      exif=Image.open(io.BytesIO(base)).getexif(), comment=b"patient 12345 Jane Example")
    data = with_icc + b"TRAILER Jane Example 12345"
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.getexif().get(GPS_IFD) is not None and raw.info.get("comment")
    stripped, fmt = strip_metadata(data)
    assert fmt == "JPEG"
    assert_no_identifying_metadata(stripped)
    assert b"ICC_PROFILE\x00" not in stripped
    assert np.array_equal(np.asarray(decode_rgb(stripped)), np.asarray(decode_rgb(with_icc)))
    stripped_xmp, _ = strip_metadata(base)
    assert_no_identifying_metadata(stripped_xmp)


def test_png_metadata_removed_losslessly() -> None:
    """tEXt, zTXt, iTXt, eXIf, tIME and private chunks go; 16-bit pixels stay bit for bit."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Jane Example")
    info.add_text("Comment", "patient 12345", zip=True)
    info.add_itxt("Description", "Jane Example, 2024:05:17", lang="en")
    exif = Image.Exif()
    exif[0xA431] = SERIAL
    arr = (np.arange(32 * 24, dtype=np.uint16).reshape(24, 32) * 80).astype(np.uint16)
    data = encode(Image.fromarray(arr), "PNG", pnginfo=info, exif=exif)
    # a tIME chunk and a private chunk before IEND
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    data = data[:-12] + chunk(b"tIME", b"\x07\xe8\x05\x11\x09\x29\x00") + chunk(b"prVt", b"Jane Example") + data[-12:]
    stripped, fmt = strip_metadata(data)
    assert fmt == "PNG"
    assert_no_identifying_metadata(stripped)
    assert b"prVt" not in stripped
    with Image.open(io.BytesIO(stripped)) as img:
        assert img.mode.startswith("I") and np.array_equal(np.asarray(img), np.asarray(Image.fromarray(arr)))


def test_tiff_is_converted_to_png_without_tags() -> None:
    """A TIFF's tags (artist, description, dates) never reach storage: it is stored as a lossless PNG."""
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[315] = ARTIST  # Artist
    tags[270] = "patient 12345"  # ImageDescription
    tags[306] = "2024:05:17 09:41:00"  # DateTime
    img = lesion()
    data = encode(img, "TIFF", tiffinfo=tags)
    assert ARTIST.encode() in data
    stripped, fmt = strip_metadata(data)
    assert fmt == "PNG"
    assert_no_identifying_metadata(stripped)
    assert np.array_equal(np.asarray(decode_rgb(stripped)), np.asarray(img))


def test_bmp_is_stored_as_a_fresh_png() -> None:
    """A BMP is stored as a lossless PNG of its pixels: bytes appended to it (or hidden in its headers) go."""
    for img in (lesion(), lesion().convert("L"), lesion().convert("P")):
        data = encode(img, "BMP") + b"\x00TRAILER " + ARTIST.encode()
        stripped, fmt = strip_metadata(data)
        assert fmt == "PNG" and ARTIST.encode() not in stripped and b"TRAILER" not in stripped
        with Image.open(io.BytesIO(stripped)) as out:
            assert out.mode == img.mode and not out.info
        assert np.array_equal(np.asarray(decode_rgb(stripped)), np.asarray(decode_rgb(data)))


def test_real_dermoscopy_jpeg_round_trip(isic2017_dir) -> None:  # type: ignore[no-untyped-def]
    """A real ISIC image: stripping keeps its pixels exactly and the draft decode keeps the aspect."""
    path = sorted((isic2017_dir / "ISIC-2017_Test_v2_Data").glob("ISIC_*.jpg"))[0]
    data = path.read_bytes()
    stripped, fmt = strip_metadata(data)
    assert fmt == "JPEG"
    assert np.array_equal(np.asarray(decode_rgb(stripped)), np.asarray(decode_rgb(data)))
    assert min(decode_rgb(data, draft_size=64).size) >= 64


def test_palette_png_keeps_its_transparency_and_loses_its_profile_name() -> None:
    """A palette PNG with transparent entries and an iCCP chunk whose name identifies someone: the stored copy has
    no iCCP, no unused palette colours, and decodes to the same pixels."""
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([255, 255, 255, 0, 200, 0] + [74, 97, 110] * 254)  # unused entries spell text bytes
    pal.paste(0, (0, 0, 8, 16))
    data = encode(pal, "PNG", transparency=0)
    body = ARTIST.encode() + b"\x00\x00" + zlib.compress(b"\x00" * 128)
    iccp = struct.pack(">I", len(body)) + b"iCCP" + body + struct.pack(">I", zlib.crc32(b"iCCP" + body))
    data = data[:33] + iccp + data[33:]
    stripped, fmt = strip_metadata(data)
    assert fmt == "PNG" and b"iCCP" not in stripped and ARTIST.encode() not in stripped
    assert bytes([74, 97, 110]) not in stripped
    assert np.array_equal(np.asarray(decode_rgb(stripped)), np.asarray(decode_rgb(data)))


def test_progressive_jpeg_loses_segments_between_scans_and_keeps_pixels() -> None:
    """An EXIF block and a comment put between two scans of a progressive JPEG are dropped; pixels stay exact."""
    data = encode(lesion((96, 64)), "JPEG", quality=90, progressive=True)
    second = data.index(b"\xff\xda", data.index(b"\xff\xda") + 2)
    exif = Image.Exif()
    exif[0xA431] = SERIAL
    app1 = exif.tobytes()
    comment = ARTIST.encode()
    data = (data[:second] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
            + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + data[second:])
    stripped, fmt = strip_metadata(data)
    assert fmt == "JPEG"
    assert_no_identifying_metadata(stripped)
    assert stripped.count(b"\xff\xda") == data.count(b"\xff\xda")
    assert np.array_equal(np.asarray(decode_rgb(stripped)), np.asarray(decode_rgb(data)))


def test_unused_quantisation_and_huffman_tables_are_dropped() -> None:
    """A DQT table id 3 and a DHT AC table id 3 that no component or scan uses, each holding text, are not stored;
    the tables in use are kept byte for byte and the pixels stay exact."""
    data = encode(lesion((64, 48)), "JPEG", quality=90)
    note = ARTIST.encode().ljust(64, b"#")
    dqt = b"\x03" + note  # 8-bit table, id 3: 64 values of text
    dht = b"\x13" + bytes([0] * 15 + [len(note)]) + note  # AC table id 3: 64 codes of 16 bits, values = text
    frame = data.index(b"\xff\xc0")
    data = (data[:frame] + b"\xff\xdb" + struct.pack(">H", len(dqt) + 2) + dqt
            + b"\xff\xc4" + struct.pack(">H", len(dht) + 2) + dht + data[frame:])
    with Image.open(io.BytesIO(data)) as img:
        assert 3 in img.quantization and img.quantization[0] is not None
    stripped, fmt = strip_metadata(data)
    assert fmt == "JPEG" and note not in stripped and ARTIST.encode() not in stripped
    with Image.open(io.BytesIO(stripped)) as img, Image.open(io.BytesIO(data)) as original:
        assert sorted(img.quantization) == [0, 1] and img.quantization[0] == original.quantization[0]
    assert np.array_equal(np.asarray(decode_rgb(stripped)), np.asarray(decode_rgb(data)))


# --- decode memory is bounded (issue 12, point 7) ---------------------------------------------------------------

def decode_peak_mb(data: bytes, tmp_path: Path) -> tuple[float, str]:
    """Decode bytes in a fresh process; return its peak RSS growth in MB while decoding, and the outcome."""
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    script = (
        "import resource, sys\n"
        "from skinscan.imaging import ImageError, decode_rgb\n"
        f"data = open({str(path)!r}, 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    outcome = 'decoded %dx%d' % decode_rgb(data, draft_size=256).size\n"
        "except ImageError as exc:\n"
        "    outcome = 'ImageError: %s' % exc\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((peak - before) / 1024)\n"
        "print(outcome)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    growth, outcome = done.stdout.strip().split("\n", 1)
    return float(growth), outcome


def test_sixteen_bit_bomb_fails_alone_with_bounded_memory(tmp_path: Path) -> None:
    """A ~100 KB 16-bit PNG of 49 megapixels (under the 8-bit pixel limit) is refused before decoding, with the
    reason, instead of costing over a gigabyte of memory."""
    data = sixteen_bit_png(7000, 7000)
    assert len(data) < 200_000
    with pytest.raises(ImageError, match="16-bit image too large"):
        sniff_format(data)
    growth, outcome = decode_peak_mb(data, tmp_path)
    assert outcome.startswith("ImageError: 16-bit image too large to decode safely (7000x7000 pixels"), outcome
    assert growth < 50, growth


def test_sixteen_bit_decode_under_the_limit_costs_little_memory(tmp_path: Path) -> None:
    """A 16-bit image just under its limit decodes with a few bytes per pixel (no full-size float copies): less
    than an 8-bit RGB image at the pixel limit would take."""
    width, height = 4000, MAX_HIGH_DEPTH_PIXELS // 4000
    growth, outcome = decode_peak_mb(sixteen_bit_png(width, height), tmp_path)
    assert outcome == f"decoded {width}x{height}", outcome
    assert growth < width * height * 10 / 2**20, growth  # ~9 bytes a pixel: samples, 8-bit copy, RGB
    assert growth < MAX_PIXELS * 4 / 2**20
