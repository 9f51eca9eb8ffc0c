"""The callbacks of every callback-mode bot, answered on WSGI directly, in front of the Flask app.

WeCom's stream-refresh polls are most of what a replica serves (about one a second for every open answer), and
Flask's request machinery around a poll (request and app contexts, URL matching, the Request and Response objects)
cost more of a poll than the gateway's own work: served this way, one replica answers a quarter more polls on the same
CPU (BENCHMARKS.md §1). This route does what Flask did for it and no more: read the query and the body (within
WECOM_MAX_BODY_BYTES), bind the log context, hand both to the bot's CallbackHandler, and answer its envelope as JSON.
A refused callback is a 4xx with a short JSON body, Redis down during a poll a 503, anything unexpected a logged 500
that says no more than "internal error". WeCom's URL check (a GET on the same path) is answered here too, so the
paths served can change while the process runs (bots changed live: services/bots_watch.py), which Flask's routes
cannot once the first request came. Every other request goes on to Flask, whose error handlers refuse and fail with
the same bodies (`rejected`, `INTERNAL_ERROR`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from http import HTTPStatus
from urllib.parse import parse_qsl

import orjson

from services import metrics
from services.callback.handler import CallbackHandler, CallbackPaths, StoreUnavailable
from services.wecom import errors
from services.wecom.errors import CallbackError
from utils.logging import log_context

logger = logging.getLogger(__name__)

STORE_UNAVAILABLE = {"error": "store_unavailable", "message": "state store unavailable, retry shortly"}
INTERNAL_ERROR = {"error": "internal_error", "message": "internal error"}
METHOD_NOT_ALLOWED = {"error": "method_not_allowed", "message": "a callback path takes GET (the URL check) and POST"}

WsgiApp = Callable[[dict, Callable], Iterable[bytes]]


def rejected(exc: CallbackError, bot: str, remote_addr: str | None) -> tuple[dict, int]:
    """Count and log a refused callback (once, at warning, without its content); its JSON body and status."""
    metrics.CALLBACKS.labels(bot, "invalid", exc.error).inc()
    logger.warning("rejected callback from %s: %s (%s)", remote_addr, exc.error, exc.message)
    return exc.body(), exc.status


# How much of a body over WECOM_MAX_BODY_BYTES is read and dropped before its 413 (a larger one is cut off: the
# client may then see a reset instead of the answer), and in what pieces.
DRAIN_BYTES = 16 * 1024 * 1024
_DISCARD_PIECE = 64 * 1024


class CallbackRoute:
    """WSGI middleware: a POST (a callback) or a GET (WeCom's URL check) to a callback-mode bot's path is answered
    here; every other request goes to `app`. `paths` gives the paths served now (Gateway.paths)."""

    def __init__(self, app: WsgiApp, paths: Callable[[], CallbackPaths], owner: str, max_body: int):
        self.app = app
        self.paths = paths
        self.owner = owner
        self.max_body = max_body

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        bot = self.paths().get(environ.get("PATH_INFO", ""))
        if bot is None:
            return self.app(environ, start_response)
        name, handler = bot
        content_type, headers = "application/json", []
        with log_context(replica=self.owner, bot=name):
            if method == "POST":
                body, status = self._answer(environ, name, handler)
            elif method in ("GET", "HEAD"):
                body, status, content_type = self._verify(environ, name, handler)
            else:
                body, status, headers = orjson.dumps(METHOD_NOT_ALLOWED), 405, [("Allow", "GET, HEAD, POST")]
        headers.append(("Content-Length", str(len(body))))
        if body:
            headers.append(("Content-Type", content_type))
        start_response(_status_line(status), headers)
        return [b""] if method == "HEAD" else [body]

    def _verify(self, environ: dict, name: str, handler: CallbackHandler) -> tuple[bytes, int, str]:
        """WeCom's URL check: the decrypted echostr as plain text."""
        try:
            echo = handler.verify_url(_query(environ.get("QUERY_STRING", "")))
        except CallbackError as exc:
            body, status = rejected(exc, name, environ.get("REMOTE_ADDR"))
            return orjson.dumps(body), status, "application/json"
        except Exception:
            logger.exception("unhandled error on GET %s", environ.get("PATH_INFO"))
            return orjson.dumps(INTERNAL_ERROR), 500, "application/json"
        logger.info("callback URL verified")
        return echo.encode(), 200, "text/plain; charset=utf-8"

    def _answer(self, environ: dict, name: str, handler: CallbackHandler) -> tuple[bytes, int]:
        """The response body and status for one callback."""
        try:
            envelope = handler.handle(_query(environ.get("QUERY_STRING", "")), self._body(environ))
        except CallbackError as exc:
            body, status = rejected(exc, name, environ.get("REMOTE_ADDR"))
            return orjson.dumps(body), status
        except StoreUnavailable:
            return orjson.dumps(STORE_UNAVAILABLE), 503
        except Exception:
            logger.exception("unhandled error on POST %s", environ.get("PATH_INFO"))
            return orjson.dumps(INTERNAL_ERROR), 500
        return (b"" if envelope is None else orjson.dumps(envelope)), 200

    def _body(self, environ: dict) -> bytes:
        """The request's body: at most `max_body` bytes, all that its Content-Length says (or, chunked, all there
        is). CallbackError otherwise; a body too large is read to its end first (up to DRAIN_BYTES), so the server
        does not close the connection with it unread and the client reads its 413 instead of a reset."""
        stream = environ["wsgi.input"]
        declared = environ.get("CONTENT_LENGTH") or ""
        if declared:
            if not (declared.isascii() and declared.isdigit()):
                raise errors.invalid_body("Content-Length is not a whole number")
            length = int(declared)
            if length > self.max_body:
                _discard(stream, min(length, DRAIN_BYTES))
                raise errors.body_too_large(self.max_body)
            body = _read(stream, length)
            if len(body) < length:
                raise errors.invalid_body("the body ended before its Content-Length")
            return body
        if not environ.get("wsgi.input_terminated"):
            return b""  # neither a length nor a chunked body: there is none
        body = _read(stream, self.max_body + 1)
        if len(body) > self.max_body:
            _discard(stream, DRAIN_BYTES)
            raise errors.body_too_large(self.max_body)
        return body


def _discard(stream, most: int) -> None:
    """Read and drop up to `most` bytes of what is left of a request body."""
    left = most
    while left > 0:
        try:
            part = stream.read(min(left, _DISCARD_PIECE))
        except Exception:  # noqa: BLE001 - a client gone, a broken chunked body: nothing left to read then
            return
        if not part:
            return
        left -= len(part)


def _read(stream, most: int) -> bytes:
    """Up to `most` bytes of a request body (fewer if it ends first)."""
    parts, left = [], most
    while left > 0:
        try:
            part = stream.read(left)
        except Exception:  # noqa: BLE001 - a client gone, a broken chunked body: each WSGI server raises its own
            raise errors.invalid_body("the body could not be read") from None
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _query(raw: str) -> dict[str, str]:
    """The query's parameters, each its first value (as Flask's `request.args.get` gives it)."""
    query: dict[str, str] = {}
    for name, value in parse_qsl(raw, keep_blank_values=True):
        query.setdefault(name, value)
    return query


@functools.cache
def _status_line(status: int) -> str:
    return f"{status} {HTTPStatus(status).phrase.upper()}"
