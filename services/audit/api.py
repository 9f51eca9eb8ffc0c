"""GET /api/audit, apart from Flask: its bearer token, its filters, and a page of rows with the next page's cursor
(docs/audit.md). Nothing of a token is logged."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

import orjson
from sqlalchemy.exc import SQLAlchemyError

from services.audit.export import FORMATS, lines, parse_time
from services.audit.records import AuditFilter, AuditRecords

MAX_LIMIT = 1000
CONTENT_TYPES = {"jsonl": "application/x-ndjson; charset=utf-8", "csv": "text/csv; charset=utf-8"}


@dataclass
class AuditReply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def _error(status: int, error: str, message: str) -> AuditReply:
    return AuditReply(status, orjson.dumps({"error": error, "message": message}))


class AuditApi:
    def __init__(self, token: str, records: AuditRecords):
        self.token = token
        self.records = records

    def page(self, authorization: str | None, args: dict[str, str]) -> AuditReply:
        """One page of rows, oldest first; `X-Next-Cursor` names the next page (absent on the last)."""
        expected = f"Bearer {self.token}".encode()
        if not hmac.compare_digest((authorization or "").encode(), expected):
            return _error(401, "unauthorized", "a valid 'Authorization: Bearer <AUDIT_API_TOKEN>' header is required")
        try:
            which, fmt, limit = _request(args)
            rows, cursor = self.records.page(which, limit, args.get("cursor", ""))
        except ValueError as exc:  # records.BadCursor too
            return _error(400, "bad_request", str(exc))
        except SQLAlchemyError:
            return _error(503, "database_unavailable", "the database did not answer; try again in a moment")
        headers = {"X-Next-Cursor": cursor} if cursor else {}
        return AuditReply(200, "".join(lines(rows, fmt)).encode(), CONTENT_TYPES[fmt], headers)


def _request(args: dict[str, str]) -> tuple[AuditFilter, str, int]:
    """The filter, format and page size a request asks for.

    Raises:
        ValueError: a parameter that is not right, said in one line.
    """
    unknown = sorted(set(args) - {"since", "until", "bot", "user", "format", "limit", "cursor"})
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r}")
    times = {}
    for name in ("since", "until"):
        if args.get(name):
            try:
                times[name] = parse_time(args[name])
            except ValueError:
                raise ValueError(f"'{name}' must be an ISO 8601 time such as 2026-11-01T00:00:00Z") from None
    fmt = args.get("format") or "jsonl"
    if fmt not in FORMATS:
        raise ValueError("'format' must be jsonl or csv")
    try:
        limit = int(args.get("limit") or MAX_LIMIT)
    except ValueError:
        raise ValueError(f"'limit' must be a number from 1 to {MAX_LIMIT}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"'limit' must be a number from 1 to {MAX_LIMIT}")
    return AuditFilter(times.get("since"), times.get("until"), args.get("bot", ""), args.get("user", "")), fmt, limit
