"""Upload limits enforced while Werkzeug parses a request, and the 413 message that names the limit crossed.

Werkzeug refuses a multipart body with more parts than `MAX_FORM_PARTS` (default 1,000) before any view runs, so
the part limit is derived from SKINSCAN_MAX_FILES: each file is one part, plus room for the form's other fields.
"""

from __future__ import annotations

from typing import IO, Any

from flask import Request, current_app, request

from skinscan.settings import Settings

# Parts a form may have besides its files: finalize, csrf_token, labels, and a margin for clients that add fields.
FORM_FIELD_HEADROOM = 64


def max_form_parts(settings: Settings) -> int:
    """Return Werkzeug's multipart part limit for these settings: SKINSCAN_MAX_FILES plus the fields' headroom."""
    return max(settings.max_files, 0) + FORM_FIELD_HEADROOM


class CountingRequest(Request):
    """Flask's request, counting the file parts it parses so a refused form can say which limit it crossed."""

    file_parts = 0

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None) -> IO[bytes]:
        self.file_parts += 1
        return super()._get_file_stream(total_content_length, content_type, filename, content_length)


def too_large_message(settings: Settings) -> str:
    """Return the message of a 413 raised while reading the request: the byte, file or form-field limit."""
    length = request.content_length
    if length is not None and length > settings.max_upload_bytes:
        return f"upload too large: the limit is {settings.max_upload_bytes:,} bytes per request"
    if getattr(request, "file_parts", 0) >= settings.max_files:
        return (f"more than {settings.max_files:,} files in one upload: the limit is {settings.max_files:,} files "
                "per request; send the rest in another part or job")
    field_limit: Any = current_app.config.get("MAX_FORM_MEMORY_SIZE")
    field_text = f", {field_limit:,} bytes per form field" if isinstance(field_limit, int) else ""
    return (f"request too large: the limits are {settings.max_upload_bytes:,} bytes and "
            f"{settings.max_files:,} files per request{field_text}")
