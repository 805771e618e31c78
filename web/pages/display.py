"""Template filters and globals: dates, percentages, class names, heat-map shades."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Flask

from skinscan.jobs.counts import job_counts
from skinscan.labels import CLASS_NAMES, CLASSES, MALIGNANT

STATUS_TEXT = {"uploading": "Uploading", "queued": "Queued", "running": "Running", "done": "Done",
               "failed": "Failed", "pending": "Waiting", "scored": "Scored"}


def when(value: datetime | None) -> str:
    """Format a timestamp as 'YYYY-MM-DD HH:MM UTC' (empty for none)."""
    if value is None:
        return ""
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def iso(value: datetime | None) -> str:
    """Format a timestamp as ISO 8601 for <time datetime>."""
    if value is None:
        return ""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def pct(value: float | None, digits: int = 1) -> str:
    """Format a 0..1 fraction as a percentage ('—' for none)."""
    return "—" if value is None else f"{value * 100:.{digits}f}%"


def num(value: float | None, digits: int = 3) -> str:
    """Format a number with fixed decimals ('—' for none)."""
    return "—" if value is None else f"{value:.{digits}f}"


def count(value: int | None) -> str:
    """Format a whole number with thousands separators, as the command line does (1,500)."""
    return "—" if value is None else f"{value:,}"


def heat(value: float) -> int:
    """Return a shade 0..10 for a 0..1 fraction (a CSS class; the page's CSP forbids inline styles)."""
    return max(0, min(10, round(value * 10)))


def register(app: Flask) -> None:
    """Install the filters and globals on an app's Jinja environment."""
    app.add_template_filter(when)
    app.add_template_filter(iso)
    app.add_template_filter(pct)
    app.add_template_filter(num)
    app.add_template_filter(heat)
    app.add_template_filter(count)
    app.jinja_env.globals.update(CLASSES=CLASSES, CLASS_NAMES=CLASS_NAMES, MALIGNANT=MALIGNANT,
                                 STATUS_TEXT=STATUS_TEXT, class_name=_class_name, job_counts=job_counts)


def _class_name(code: Any) -> str:
    return CLASS_NAMES.get(str(code), str(code)) if code else "—"
