"""Every way a Dify call can fail, as one exception family (logs, metrics and the user's note key off `code`)."""

from __future__ import annotations

import orjson


class DifyError(Exception):
    """Any failure of a Dify call. `code` is a short machine-readable reason for logs, metrics and the hash."""

    code = "dify_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.status = status


class DifyHTTPError(DifyError):
    """Dify answered the request with a non-2xx status before any stream began."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message, code=code or f"http_{status}", status=status)


class DifyConnectionError(DifyError):
    """Dify could not be reached (DNS, refused, TLS, connect timeout), or (`request_sent`) the connection ended after
    the whole request was sent and before any answer: Dify may have taken it, so it is not sent again."""

    code = "connect_error"

    def __init__(self, message: str, request_sent: bool = False):
        super().__init__(message)
        self.request_sent = request_sent


class DifyTimeout(DifyError):
    """Dify sent nothing for longer than the read timeout, or the answer ran past the total limit."""

    code = "timeout"


class DifyStreamError(DifyError):
    """Dify sent an `error` event mid-stream (the HTTP status was already 200)."""


class DifyStreamCut(DifyError):
    """The stream ended, or the connection broke, before `message_end`."""

    code = "stream_cut"


# Statuses by which Dify (or its proxy) says it did not take a request: it is sent again safely. A 502 or 504 from a
# proxy, or a connection that broke after the request was sent, may come after Dify began to answer it, and a second
# call would be a second answer (and a second bill).
REFUSED_STATUS = frozenset({429, 503})


def never_taken(exc: Exception) -> bool:
    """Whether the failed call provably never reached Dify's app: refused (429, 503), or no connection made or the
    request not sent. Only such a call of a question's POST may be made again."""
    if isinstance(exc, DifyConnectionError):
        return not exc.request_sent
    return isinstance(exc, DifyHTTPError) and exc.status in REFUSED_STATUS


def http_error(status: int, raw: bytes) -> DifyHTTPError:
    """Read Dify's `{code, message, status}` error body (or whatever a proxy sent) into a DifyHTTPError."""
    code, message = "", ""
    try:
        data = orjson.loads(raw)
        if isinstance(data, dict):
            code, message = str(data.get("code") or ""), str(data.get("message") or "")
    except orjson.JSONDecodeError:
        message = raw[:200].decode("utf-8", errors="replace").strip()
    return DifyHTTPError(status, code, message or f"HTTP {status}")
