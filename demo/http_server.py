"""A small asyncio HTTP/1.1 server for the stand-ins: full control of the bytes on the wire.

Handlers get the parsed request and a `Conn` to answer with: a whole response, or a chunked stream written piece
by piece (each `write_chunk` is flushed as its own chunk, so a JSON object can be split across network reads),
which can also be cut mid-stream with `abort()`. Runs on its own event loop in a daemon thread, so tests and the
local demo can start it in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import orjson

logger = logging.getLogger(__name__)

_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_MAX_HEADER_BYTES = 64 * 1024
_MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    extras: dict = field(default_factory=dict)

    def json(self):
        return orjson.loads(self.body) if self.body else None


class Conn:
    """The response side of one request."""

    def __init__(self, writer: asyncio.StreamWriter):
        self._writer = writer
        self.aborted = False
        self.keep_alive = True

    async def send(
        self,
        status: int,
        body: bytes | dict | list | str = b"",
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """A complete response with Content-Length."""
        if isinstance(body, (dict, list)):
            body, content_type = orjson.dumps(body), content_type or "application/json"
        elif isinstance(body, str):
            body, content_type = body.encode(), content_type or "text/plain; charset=utf-8"
        head = {"Content-Type": content_type or "application/octet-stream", "Content-Length": str(len(body))}
        head.update(headers or {})
        self._writer.write(_head(status, head) + body)
        await self._writer.drain()

    async def start_stream(
        self, status: int = 200, content_type: str = "text/event-stream", headers: dict[str, str] | None = None
    ) -> None:
        """Start a chunked response; follow with write_chunk() calls and end_stream() (or abort())."""
        head = {"Content-Type": content_type, "Transfer-Encoding": "chunked", "Cache-Control": "no-cache"}
        head.update(headers or {})
        self._writer.write(_head(status, head))
        await self._writer.drain()

    async def write_chunk(self, data: bytes) -> None:
        if data:
            self._writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await self._writer.drain()

    async def end_stream(self) -> None:
        self._writer.write(b"0\r\n\r\n")
        await self._writer.drain()

    def abort(self) -> None:
        """Drop the connection mid-response (no terminating chunk), like a proxy timing out."""
        self.aborted = True
        self.keep_alive = False
        transport = self._writer.transport
        with contextlib.suppress(Exception):
            transport.abort()


Handler = Callable[[Request, Conn], Awaitable[None]]


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class StandInServer:
    """Serves `handler` on host:port (0 = any free port) from a background event loop; over TLS with `tls`."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None):
        self.handler = handler
        self.host = host
        self.port = port
        self.tls = tls
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self) -> StandInServer:
        """Start serving in a daemon thread; returns once the port is bound."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            try:
                self._server = self.loop.run_until_complete(
                    asyncio.start_server(
                        self._serve_connection,
                        self.host,
                        self.port,
                        backlog=4096,
                        limit=_MAX_HEADER_BYTES,
                        ssl=self.tls,
                    )
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except Exception as exc:  # noqa: BLE001 - handed to the starting thread, which raises it
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=serve, name=f"standin-{self.port}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listening socket and every open connection, then stop the loop."""
        if self.loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._connections):
                writer.transport.abort()
            pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def call(self, coro_factory: Callable[[], Awaitable]) -> object:
        """Run a coroutine on the server's loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro_factory(), self.loop).result(10)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                conn = Conn(writer)
                if request.headers.get("connection", "").lower() == "close":
                    conn.keep_alive = False
                try:
                    await self.handler(request, conn)
                except (ConnectionError, asyncio.IncompleteReadError):
                    break
                except Exception:
                    logger.exception("stand-in handler failed")
                    with contextlib.suppress(Exception):
                        await conn.send(500, {"code": "standin_error", "message": "stand-in failed", "status": 500})
                if not conn.keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            logger.debug("stand-in connection ended: %s", type(exc).__name__)
        except asyncio.CancelledError:
            logger.debug("stand-in connection cancelled at shutdown")
        finally:
            self._connections.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    """Parse one request; None when the peer closed the connection between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    if length > _MAX_BODY_BYTES:
        raise ValueError("request body too large for the stand-in")
    body = await reader.readexactly(length) if length else b""
    parts = urlsplit(target)
    return Request(
        method=method.upper(), path=parts.path, query=dict(parse_qsl(parts.query)), headers=headers, body=body
    )
