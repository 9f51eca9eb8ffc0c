"""Every way a backend's call (Dify's, an OpenAI-compatible server's) can fail, as one exception family (logs, metrics
and the user's note key off `code`)."""

from __future__ import annotations

import orjson


class BackendError(Exception):
    """Any failure of a backend's call. `code` is a short machine-readable reason for logs, metrics and the hash."""

    code = "backend_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.status = status


class BackendHTTPError(BackendError):
    """The backend answered the request with a non-2xx status before any stream began."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message, code=code or f"http_{status}", status=status)


class BackendConnectionError(BackendError):
    """The backend could not be reached (DNS, refused, TLS, connect timeout), or (`request_sent`) the connection ended
    after the whole request was sent and before any answer: the backend may have taken it, so it is not sent again."""

    code = "connect_error"

    def __init__(self, message: str, request_sent: bool = False):
        super().__init__(message)
        self.request_sent = request_sent


class BackendTimeout(BackendError):
    """The backend sent nothing for longer than the read timeout, or the answer ran past the total limit."""

    code = "timeout"


class BackendStreamError(BackendError):
    """The backend reported an error mid-stream (the HTTP status was already 200)."""


class BackendStreamCut(BackendError):
    """The stream ended, or the connection broke, before `message_end`."""

    code = "stream_cut"


# A backend's words for "busy" (Dify's, an OpenAI-compatible server's), whatever status they came with.
BUSY_CODES = frozenset({"too_many_requests", "rate_limit_error"})


def record_code(exc: BackendError) -> str:
    """The failure's code as a stream's record keeps it (`error`, before the message): an HTTP refusal by its
    status, whatever code its body named (`http_503`), a busy backend by one word (`too_many_requests`), else the
    error's own code. What a schedule asks again for keys off it (services/schedules/scheduler.py)."""
    if isinstance(exc, BackendHTTPError) and exc.status and exc.status >= 400:
        return f"http_{exc.status}"
    if exc.code in BUSY_CODES:
        return "too_many_requests"
    return exc.code


def access_problem_of(exc: BackendError, timeout: float, key: str, address: str, server: str) -> str:
    """One line for an operator saying why a check of a backend's address and key failed (the clients'
    `access_problem`), in the words of the setting to fix and never the key itself: `key` names its setting,
    `address` says what its address should be, `server` what should be running there. A failure of another kind is
    raised again."""
    if isinstance(exc, BackendHTTPError):
        if exc.status in (401, 403):
            return f"the key was refused (HTTP {exc.status}): check {key}"
        if exc.status == 404:
            return f"HTTP 404: {address}"
        return f"it answered HTTP {exc.status} ({exc.code})"
    if isinstance(exc, BackendTimeout):
        return f"it did not answer within {timeout:.0f} s"
    if isinstance(exc, BackendConnectionError):
        return f"nothing answers there: is {server} running at that address?"
    raise exc


# Statuses by which a backend (or its proxy) says it did not take a request: it is sent again safely. A 502 or 504
# from a proxy, or a connection that broke after the request was sent, may come after the backend began to answer it,
# and a second call would be a second answer (and a second bill).
REFUSED_STATUS = frozenset({429, 503})


def never_taken(exc: Exception) -> bool:
    """Whether the failed call provably never reached the backend: refused (429, 503), or no connection made or the
    request not sent. Only such a call of a question's POST may be made again."""
    if isinstance(exc, BackendConnectionError):
        return not exc.request_sent
    return isinstance(exc, BackendHTTPError) and exc.status in REFUSED_STATUS


def http_error(status: int, raw: bytes) -> BackendHTTPError:
    """Read a backend's `{code, message, status}` error body (Dify's; an OpenAI-compatible server's `{error: {...}}`;
    whatever a proxy sent) into a BackendHTTPError."""
    code, message = "", ""
    try:
        data = orjson.loads(raw)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):  # OpenAI's shape
            data = {"code": data["error"].get("code") or data["error"].get("type"), **data["error"]}
        if isinstance(data, dict):
            code, message = str(data.get("code") or ""), str(data.get("message") or "")
    except orjson.JSONDecodeError:
        message = raw[:200].decode("utf-8", errors="replace").strip()
    return BackendHTTPError(status, code, message or f"HTTP {status}")


class Declined(Exception):
    """The message cannot be answered as sent (e.g. a file the app does not take): a note instead, no backend call.
    `failed` when it went wrong on the way (the file could not be read), not by the app's choice."""

    def __init__(self, note_key: str, failed: bool = False):
        super().__init__(note_key)
        self.note_key = note_key
        self.failed = failed
