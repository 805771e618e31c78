"""Image decoding shared by upload, worker and training: type checks, safe decode, upright RGB, metadata removal."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats SkinScan scores. Anything else is refused with 415 at upload.
ACCEPTED_FORMATS: dict[str, str] = {"JPEG": "image/jpeg", "PNG": "image/png", "BMP": "image/bmp",
                                    "TIFF": "image/tiff"}
# Largest image accepted, in pixels; more is treated as a decompression bomb.
MAX_PIXELS = 50_000_000
# Largest image with 16 or 32 bits per sample (16-bit greyscale PNG/TIFF, 32-bit integer or float TIFF). Such
# samples take 2-4 bytes each in memory and need a conversion to 8-bit RGB on top, so they get a quarter of the
# limit: decoding one then costs at most about 9 bytes a pixel (~110 MB), less than an 8-bit RGB image at
# MAX_PIXELS (4 bytes a pixel, 200 MB), and a small file can no longer make a decode thread take a gigabyte.
MAX_HIGH_DEPTH_PIXELS = MAX_PIXELS // 4
MIN_SIDE = 8
# Rows of a high-depth image scaled to 8 bits at a time: about this many pixels, so the float arithmetic on a band
# stays a few tens of megabytes whatever the image's size.
_BAND_PIXELS = 1 << 20


class ImageError(ValueError):
    """An image that cannot be scored; the message says why, in words a clinic can act on."""

    def __init__(self, message: str, unsupported: bool = False) -> None:
        self.unsupported = unsupported
        super().__init__(message)


def _high_depth(mode: str) -> bool:
    """Whether Pillow holds this mode with 16 or 32 bits per sample (I;16*, I, F)."""
    return mode.startswith(("I", "F"))


def _check_size(fmt: str, width: int, height: int, frames: int, mode: str = "RGB") -> None:
    """Raise ImageError for dimensions, depths or frame counts SkinScan will not score."""
    if width * height > MAX_PIXELS:
        raise ImageError(f"image too large ({width}x{height} pixels; limit {MAX_PIXELS:,}; possible "
                         "decompression bomb)")
    if _high_depth(mode) and width * height > MAX_HIGH_DEPTH_PIXELS:
        bits = 16 if mode.startswith("I;16") else 32
        raise ImageError(f"{bits}-bit image too large to decode safely ({width}x{height} pixels; limit "
                         f"{MAX_HIGH_DEPTH_PIXELS:,} for images with 16 or 32 bits per sample, which take several "
                         "times the memory of an 8-bit image); send it as an 8-bit image or smaller")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"image too small ({width}x{height} pixels; at least {MIN_SIDE} per side)")
    if frames > 1:
        raise ImageError(f"multi-frame {fmt} ({frames} frames) is not supported; send one image")


def sniff_format(data: bytes) -> str:
    """Return the Pillow format name of encoded image bytes, or raise ImageError if not an accepted image.

    Reads the header only: the type, the dimensions (too large or too small is refused here) and the frame count.
    A multi-picture JPEG (MPO, as some cameras write) counts as JPEG: its first picture is the image.
    """
    img, fmt = _open_checked(data)
    img.close()
    return fmt


def _open_checked(data: bytes) -> tuple[Image.Image, str]:
    """Open image bytes lazily (header only) after sniff_format's checks; return the image and its format.

    The caller owns the open image: decoding goes on from it, so the header is parsed once per image.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    head = data[:512].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml", b"<!doctype", b"<html")):
        raise ImageError("not a supported image: SVG/HTML/XML text", unsupported=True)
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftyphevc", b"ftypavif"):
        raise ImageError("HEIC/AVIF images are not supported; export as JPEG or PNG", unsupported=True)
    img = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or ""
            if fmt == "MPO":
                fmt, frames = "JPEG", 1
            else:
                frames = getattr(img, "n_frames", 1) if fmt in ACCEPTED_FORMATS else 1
            width, height = img.size
            mode = img.mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("image dimensions too large (possible decompression bomb)") from None
    except UnidentifiedImageError:
        raise ImageError("not a recognised image file", unsupported=True) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad headers
        if img is not None:
            img.close()
        raise ImageError(f"unreadable image header: {exc}") from None
    try:
        if fmt not in ACCEPTED_FORMATS:
            raise ImageError(f"{fmt or 'this'} images are not supported; use JPEG, PNG, BMP or TIFF",
                             unsupported=True)
        _check_size(fmt, width, height, frames, mode)
    except ImageError:
        img.close()
        raise
    return img, fmt


def _to_eight_bit(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float greyscale image to 8-bit L, a band of rows at a time (bounded memory).

    16-bit samples map 0..65535 to 0..255 (32-bit integers likewise when any exceeds 255, else they are taken as
    0..255); float samples are stretched from their minimum to their maximum.
    """
    width, height = img.size
    if img.mode.startswith("I;16"):
        offset, top = 0.0, 65535.0
    else:
        low, high = img.getextrema()  # I and F only (not I;16B and kin)
        if img.mode == "F":
            offset, top = float(low), max(float(high) - float(low), 1e-9)
        else:
            offset, top = 0.0, 65535.0 if high > 255 else 255.0
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _BAND_PIXELS // max(width, 1))
    for y in range(0, height, rows):
        band = np.asarray(img.crop((0, y, width, min(height, y + rows))), dtype=np.float64)
        out[y : y + band.shape[0]] = np.clip((band - offset) / top * 255.0, 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, scaling 16-bit and compositing transparency on black."""
    if _high_depth(img.mode):
        return _to_eight_bit(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        on_black = Image.new("RGB", rgba.size)  # pasting through the alpha is compositing on black, one copy less
        on_black.paste(rgba, mask=rgba)
        return on_black
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def _orientation(img: Image.Image) -> int:
    """Return the EXIF orientation (1 = upright), or 1 when the EXIF block is missing or unreadable."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make good pixels unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def decode_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to an upright 8-bit RGB image; raise ImageError with a reason if it cannot be scored.

    With draft_size, JPEGs decode straight at the smallest scale (1/2, 1/4, 1/8) whose shorter side is still
    at least draft_size, which is several times faster for large photographs.
    """
    img, fmt = _open_checked(data)  # the checks of sniff_format, on the image decoded next
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            width, height = img.size
            orientation = _orientation(img)
            if draft_size and fmt == "JPEG":
                # draft() works on the stored orientation; the shorter side is the same either way.
                scale = min(width, height) / draft_size
                if scale >= 2:
                    img.draft("RGB", (max(1, int(width / scale)), max(1, int(height / scale))))
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("image dimensions too large (possible decompression bomb)") from None
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
        raise ImageError(f"corrupt or truncated {fmt} image: {exc}") from None
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


# JPEG segments a decoder needs: frame headers (SOF0-15 but DHT, JPG and DAC), Huffman and arithmetic tables,
# quantisation tables, restart interval, line count and scans. Everything else (APPn: EXIF, XMP, ICC, MPF,
# vendor data; COM) is dropped wherever it sits, between scans of a progressive file included.
_JPEG_KEEP = {m for m in range(0xC0, 0xD0) if m != 0xC8} | {0xDA, 0xDB, 0xDC, 0xDD}
_JPEG_RST = range(0xD0, 0xD8)
_JPEG_FRAMES = _JPEG_KEEP - {0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD}  # SOF0-15: their components name DQT tables
# Pillow modes a PNG is re-encoded in as they are (lossless, 16-bit greyscale included).
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}


def _jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes((0xFF, marker)) + (len(body) + 2).to_bytes(2, "big") + body


def _rebuilt_app(marker: int, body: bytes) -> bytes:
    """A fresh JFIF (APP0, no thumbnail) or Adobe (APP14, colour transform only) segment; b"" for any other APPn."""
    if marker == 0xE0 and body[:5] == b"JFIF\x00" and len(body) >= 14:
        units = body[7] if body[7] <= 2 else 0  # version 1.02, density units and density; no thumbnail
        return _jpeg_segment(0xE0, b"JFIF\x00\x01\x02" + bytes((units,)) + body[8:12] + b"\x00\x00")
    if marker == 0xEE and body[:5] == b"Adobe" and len(body) >= 12:
        transform = body[11] if body[11] <= 2 else 0
        return _jpeg_segment(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00" + bytes((transform,)))
    return b""


def _quant_tables(body: bytes) -> list[tuple[int, bytes]] | None:
    """Split a DQT segment into its tables: (table id, the table's bytes); None if the segment is malformed."""
    tables, pos = [], 0
    while pos < len(body):
        precision, table = body[pos] >> 4, body[pos] & 0x0F
        length = 1 + (128 if precision else 64)
        if precision > 1 or table > 3 or pos + length > len(body):
            return None
        tables.append((table, body[pos : pos + length]))
        pos += length
    return tables


def _huffman_tables(body: bytes) -> list[tuple[int, bytes]] | None:
    """Split a DHT segment into its tables: (class << 4 | id, the table's bytes); None if malformed."""
    tables, pos = [], 0
    while pos < len(body):
        if pos + 17 > len(body) or body[pos] >> 4 > 1 or body[pos] & 0x0F > 3:
            return None
        length = 17 + sum(body[pos + 1 : pos + 17])
        if pos + length > len(body):
            return None
        tables.append((body[pos], body[pos : pos + length]))
        pos += length
    return tables


def _tables_used(parts: list[tuple[int, bytes] | bytes]) -> tuple[set[int], set[int]] | None:
    """The quantisation table ids the frame's components name and the Huffman tables (class << 4 | id) the scans
    name; None if a frame or scan header is malformed."""
    quant: set[int] = set()
    huffman: set[int] = set()
    for part in parts:
        if isinstance(part, bytes):
            continue
        marker, body = part
        if marker == 0xDA:
            count = body[0] if body else 0
            if len(body) < 1 + 2 * count:
                return None
            for i in range(count):
                selectors = body[2 + 2 * i]
                huffman |= {selectors >> 4, 0x10 | (selectors & 0x0F)}
        elif marker in _JPEG_FRAMES:
            count = body[5] if len(body) > 5 else 0
            if len(body) < 6 + 3 * count:
                return None
            quant |= {body[6 + 3 * i + 2] for i in range(count)}
    return quant, huffman


def _assemble(parts: list[tuple[int, bytes] | bytes]) -> bytes | None:
    """Write the kept segments and scan data, each DQT and DHT cut to the tables the frame and scans use (an unused
    table is 64 to 256 bytes anyone could fill); None if a header is malformed."""
    used = _tables_used(parts)
    if used is None:
        return None
    quant, huffman = used
    out = bytearray(b"\xff\xd8")
    for part in parts:
        if isinstance(part, bytes):
            out += part
            continue
        marker, body = part
        if marker in (0xDB, 0xC4):
            tables = _quant_tables(body) if marker == 0xDB else _huffman_tables(body)
            if tables is None:
                return None
            body = b"".join(t for ident, t in tables if ident in (quant if marker == 0xDB else huffman))
            if not body:
                continue
        out += _jpeg_segment(marker, body)
    return bytes(out)


def _rebuild_jpeg(data: bytes) -> bytes | None:
    """Rebuild a JPEG from an allow-list of segments, keeping its compressed pixels bit for bit.

    Walks every marker up to the first end-of-image, skipping over each scan's entropy-coded data, so a segment
    between the scans of a progressive JPEG is seen too; nothing after the end-of-image (a second picture of a
    multi-picture file, camera trailers) is kept, nor a quantisation or Huffman table nothing uses. A scan cut off
    before its end keeps no data: such a file cannot be decoded anyway, and its tail could be anything. Returns
    None if the layout is not a JPEG's.
    """
    if data[:2] != b"\xff\xd8":
        return None
    parts: list[tuple[int, bytes] | bytes] = []  # kept segments (marker, body) and scan data, in file order
    pos, size = 2, len(data)
    while pos < size:
        if data[pos] != 0xFF:
            return None
        while pos < size and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= size:
            return None
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            whole = _assemble(parts)
            return None if whole is None else whole + b"\xff\xd9"
        if marker in _JPEG_RST or marker in (0x01, 0xD8):  # stand-alone markers out of place carry nothing
            continue
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > size:
            return None
        body = data[pos + 2 : pos + length]
        pos += length
        if marker in _JPEG_KEEP:
            parts.append((marker, body))
        elif 0xE0 <= marker <= 0xEF:
            app = _rebuilt_app(marker, body)
            if app:
                parts.append(app)
        if marker != 0xDA:
            continue
        start = pos  # entropy-coded data: up to a marker other than a stuffed 0xFF00 or a restart marker
        while True:
            ff = data.find(b"\xff", pos)
            if ff < 0 or ff + 1 >= size:
                return _assemble(parts)  # cut off inside a scan: decoding it fails with "truncated" either way
            following = data[ff + 1]
            if following == 0x00 or following in _JPEG_RST:
                pos = ff + 2
            elif following == 0xFF:  # fill bytes: the marker is what follows them
                pos = ff + 1
            else:
                break
        while ff > start and data[ff - 1] == 0xFF:
            ff -= 1
        parts.append(data[start:ff])
        pos = ff
    return None


def _reencoded_png(img: Image.Image) -> bytes | None:
    """Write a decoded image as a fresh PNG in its own mode (lossless) with nothing but its pixels.

    Keeps the transparency decoding needs; unused palette entries are blanked. Returns None for a mode PNG cannot
    hold as it is.
    """
    if img.mode not in _PNG_MODES:
        return None
    transparency = img.info.get("transparency")
    img.info = {}  # Pillow would write a profile, EXIF or text it finds here into the new file
    if img.mode == "P":
        used = {index for _, index in img.getcolors(256) or []}
        palette = img.getpalette() or []
        img.putpalette([v if i // 3 in used else 0 for i, v in enumerate(palette)])
        if isinstance(transparency, bytes):
            transparency = bytes(a if i in used else 255 for i, a in enumerate(transparency))
    out = io.BytesIO()
    extra = {} if transparency is None else {"transparency": transparency}
    img.save(out, "PNG", compress_level=3, **extra)  # 2-3x faster than the default 6, files ~8 % larger
    return out.getvalue()


def strip_metadata(data: bytes) -> tuple[bytes, str]:
    """Return the image without identifying metadata (EXIF, GPS, XMP, IPTC, ICC, text, trailers), and its format.

    Only what decoding needs is stored. A JPEG is rebuilt from an allow-list of segments (its compressed pixels
    untouched), or re-encoded upright at quality 95 when an EXIF tag says it is rotated, since dropping the tag
    would turn it. PNG and BMP are decoded and written as a fresh lossless PNG in their own mode (upright); TIFF
    (whose tags can hold anything, and whose modes PNG may not hold) as a lossless 8-bit RGB PNG.
    """
    header, fmt = _open_checked(data)  # sniff_format's checks; its EXIF says whether a JPEG is rotated
    with header:
        rotated = fmt == "JPEG" and _orientation(header) != 1
    if fmt == "JPEG":
        rebuilt = None if rotated else _rebuild_jpeg(data)
        if rebuilt is not None:
            return rebuilt, fmt
    elif fmt in ("PNG", "BMP"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:
                    orientation = _orientation(img)
                    img.load()
                    upright = ImageOps.exif_transpose(img) if orientation != 1 else img
                    png = _reencoded_png(upright)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError("image dimensions too large (possible decompression bomb)") from None
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
            raise ImageError(f"corrupt or truncated {fmt} image: {exc}") from None
        if png is not None:
            return png, "PNG"
    upright = decode_rgb(data)
    upright.info = {}  # Pillow writes a comment, profile or transparency it finds here into the new file
    out = io.BytesIO()
    if fmt == "JPEG":
        upright.save(out, "JPEG", quality=95, subsampling=0)
        return out.getvalue(), fmt
    upright.save(out, "PNG")
    return out.getvalue(), "PNG"
