"""The audit rows as an export writes them: JSON lines or CSV, times in ISO 8601 UTC, oldest first (docs/audit.md).
One formatter for the CLI's export and GET /api/audit, so both say the same thing."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

import orjson

from services.audit.table import wecom_audit

COLUMNS = tuple(str(column.name) for column in wecom_audit.columns)  # plain str: orjson takes no subclass
FORMATS = ("jsonl", "csv")


def parse_time(text: str) -> datetime:
    """An ISO 8601 time (a date alone is its midnight; no zone is UTC) as the table keeps it: naive UTC.

    Raises:
        ValueError: not a time.
    """
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def lines(rows: Iterable[dict], fmt: str) -> Iterator[str]:
    """The rows as text lines of `fmt` (CSV begins with its header), each ending in a newline."""
    if fmt == "csv":
        yield _csv_line(COLUMNS)
        for row in rows:
            yield _csv_line([_plain(row[name]) for name in COLUMNS])
        return
    for row in rows:
        yield orjson.dumps(plain_row(row)).decode() + "\n"


def plain_row(row: dict) -> dict:
    """A row as JSON shows it: its columns in the table's order, times in ISO 8601 UTC."""
    return {name: _plain(row[name]) for name in COLUMNS}


def _plain(value):
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")
    return value


def _csv_line(values) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(["" if value is None else value for value in values])
    return buffer.getvalue()
