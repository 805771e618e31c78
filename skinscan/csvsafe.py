"""Spreadsheet-safe CSV cells: text a spreadsheet would run as a formula is written as plain text."""

from __future__ import annotations

import csv
import io
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

# OWASP "CSV Injection": a cell starting with one of these is read as a formula (or, for tab and CR, can be
# turned into one) by Excel, LibreOffice and Google Sheets.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
# Look-alikes a spreadsheet (or a later NFKC normalisation) may read as one of those: every character whose
# compatibility form is a trigger (fullwidth ＝ U+FF1D, ＋, －, ＠; small ﹦ ﹢ ﹣ ﹫; super- and subscript = and +)
# is found by NFKC; the minus sign U+2212 (also what superscript and subscript minus normalise to) is named here.
LOOKALIKE_TRIGGERS = frozenset({"\u2212"})


def starts_like_formula(text: str) -> bool:
    """Return whether text begins with a formula trigger or a character that looks like or normalises to one."""
    if not text:
        return False
    first = text[0]
    if first in FORMULA_TRIGGERS or first in LOOKALIKE_TRIGGERS:
        return True
    if first.isascii():
        return False
    folded = unicodedata.normalize("NFKC", first)
    return folded.startswith(FORMULA_TRIGGERS) or folded[:1] in LOOKALIKE_TRIGGERS


def csv_cell(value: Any) -> Any:
    """Return a text cell prefixed with a single quote when it starts like a formula; other values unchanged."""
    if isinstance(value, str) and starts_like_formula(value):
        return "'" + value
    return value


def csv_row(values: list[Any]) -> list[Any]:
    """Return a CSV row with every text cell made spreadsheet-safe (see csv_cell)."""
    return [csv_cell(v) for v in values]


def iter_csv_text(header: Sequence[str], batches: Iterable[Iterable[list[Any]]]) -> Iterator[str]:
    """Yield a CSV document as text to stream: the header, then one piece per batch of rows, every text cell made
    spreadsheet-safe (csv_row)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for rows in batches:
        for values in rows:
            writer.writerow(csv_row(values))
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
    rest = buf.getvalue()
    if rest:
        yield rest
