"""Spreadsheet-safe CSV cells: text a spreadsheet would run as a formula is written as plain text."""

from __future__ import annotations

from typing import Any

# OWASP "CSV Injection": a cell starting with one of these is read as a formula (or, for tab and CR, can be
# turned into one) by Excel, LibreOffice and Google Sheets.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """Return a text cell prefixed with a single quote when it starts like a formula; other values unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value


def csv_row(values: list[Any]) -> list[Any]:
    """Return a CSV row with every text cell made spreadsheet-safe (see csv_cell)."""
    return [csv_cell(v) for v in values]
