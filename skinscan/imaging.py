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
MIN_SIDE = 8


class ImageError(ValueError):
    """An image that cannot be scored; the message says why, in words a clinic can act on."""

    def __init__(self, message: str, unsupported: bool = False) -> None:
        self.unsupported = unsupported
        super().__init__(message)


def _check_size(fmt: str, width: int, height: int, frames: int) -> None:
    """Raise ImageError for dimensions or frame counts SkinScan will not score."""
    if width * height > MAX_PIXELS:
        raise ImageError(f"image too large ({width}x{height} pixels; limit {MAX_PIXELS:,}; possible "
                         "decompression bomb)")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"image too small ({width}x{height} pixels; at least {MIN_SIDE} per side)")
    if frames > 1:
        raise ImageError(f"multi-frame {fmt} ({frames} frames) is not supported; send one image")


def sniff_format(data: bytes) -> str:
    """Return the Pillow format name of encoded image bytes, or raise ImageError if not an accepted image.

    Reads the header only: the type, the dimensions (too large or too small is refused here) and the frame count.
    A multi-picture JPEG (MPO, as some cameras write) counts as JPEG: its first picture is the image.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    head = data[:512].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml", b"<!doctype", b"<html")):
        raise ImageError("not a supported image: SVG/HTML/XML text", unsupported=True)
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftyphevc", b"ftypavif"):
        raise ImageError("HEIC/AVIF images are not supported; export as JPEG or PNG", unsupported=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or ""
                if fmt == "MPO":
                    fmt, frames = "JPEG", 1
                else:
                    frames = getattr(img, "n_frames", 1) if fmt in ACCEPTED_FORMATS else 1
                width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("image dimensions too large (possible decompression bomb)") from None
    except UnidentifiedImageError:
        raise ImageError("not a recognised image file", unsupported=True) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad headers
        raise ImageError(f"unreadable image header: {exc}") from None
    if fmt not in ACCEPTED_FORMATS:
        raise ImageError(f"{fmt or 'this'} images are not supported; use JPEG, PNG, BMP or TIFF",
                         unsupported=True)
    _check_size(fmt, width, height, frames)
    return fmt


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, scaling 16-bit and compositing transparency on black."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = (arr - arr.min()) / max(float(np.ptp(arr)), 1e-9) * 255.0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
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
    fmt = sniff_format(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
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


_JPEG_KEEP_APP = {0xE0, 0xEE}  # JFIF, Adobe (colour transform); APP2 only when it is an ICC profile
# PNG chunks that carry pixels or how to show them; everything else (text, EXIF, time, private chunks) is dropped.
_PNG_KEEP = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT",
             b"bKGD", b"pHYs", b"cICP"}


def _strip_jpeg(data: bytes) -> bytes | None:
    """Drop EXIF/XMP/IPTC/comment segments and anything after the image from a JPEG without re-encoding.

    Returns None if the layout is unexpected. Data after the end-of-image marker (a second picture of a
    multi-picture file, camera trailers) is dropped too: it can carry its own metadata.
    """
    if data[:2] != b"\xff\xd8":
        return None
    out = bytearray(b"\xff\xd8")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: image data up to the end-of-image marker
            end = data.find(b"\xff\xd9", pos)
            out += data[pos:] if end < 0 else data[pos : end + 2]
            return bytes(out)
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos : pos + 2 + length]
        icc = marker == 0xE2 and segment[4:16] == b"ICC_PROFILE\x00"
        if not ((0xE0 <= marker <= 0xEF and marker not in _JPEG_KEEP_APP and not icc) or marker == 0xFE):
            out += segment
        pos += 2 + length
    return None


def _strip_png(data: bytes) -> bytes | None:
    """Keep only a PNG's pixel and colour chunks, without touching pixels; None if the layout is unexpected."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    out = bytearray(data[:8])
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if kind in _PNG_KEEP:
            out += data[pos:end]
        pos = end
        if kind == b"IEND":
            return bytes(out)
    return None


def strip_metadata(data: bytes) -> tuple[bytes, str]:
    """Return the image without identifying metadata (EXIF, GPS, XMP, IPTC, text), and its format.

    JPEG and PNG are stripped losslessly segment by segment; one that an EXIF tag says is rotated is
    re-encoded upright (JPEG at quality 95, PNG losslessly) since dropping the tag would turn it; BMP carries
    no metadata; TIFF (whose tags can hold anything) is re-encoded as lossless PNG.
    """
    fmt = sniff_format(data)
    if fmt == "BMP":
        return data, fmt
    if fmt in ("JPEG", "PNG"):
        with Image.open(io.BytesIO(data)) as img:
            rotated = _orientation(img) != 1
        stripped = None if rotated else _strip_jpeg(data) if fmt == "JPEG" else _strip_png(data)
        if stripped is not None:
            return stripped, fmt
    upright = decode_rgb(data)
    upright.info = {}  # Pillow writes a comment, profile or transparency it finds here into the new file
    out = io.BytesIO()
    if fmt == "JPEG":
        upright.save(out, "JPEG", quality=95, subsampling=0)
        return out.getvalue(), fmt
    upright.save(out, "PNG")
    return out.getvalue(), "PNG"
