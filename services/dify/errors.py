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
    """Dify could not be reached (DNS, refused, TLS, connect timeout)."""

    code = "connect_error"


class DifyTimeout(DifyError):
    """Dify sent nothing for longer than the read timeout, or the answer ran past the total limit."""

    code = "timeout"


class DifyStreamError(DifyError):
    """Dify sent an `error` event mid-stream (the HTTP status was already 200)."""


class DifyStreamCut(DifyError):
    """The stream ended, or the connection broke, before `message_end`."""

    code = "stream_cut"


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
