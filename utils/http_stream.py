"""A minimal HTTP/1.1 client for one long streaming POST (the Dify SSE call), lean on the hot path.

httpx's per-read cost (httpcore + h11) was measured at about 120 us of CPU per network read, the largest cost
of relaying a delta (BENCHMARKS.md). Here a read is one recv() into a buffer and an in-place chunked decode.
Only what the streaming call needs: http and https, Content-Length / chunked / read-to-close bodies, one
request per connection, identity encoding, timeouts as socket timeouts.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator
from urllib.parse import urlsplit

_MAX_HEAD_BYTES = 64 * 1024
_READ_SIZE = 64 * 1024
_TLS_CONTEXT: ssl.SSLContext | None = None
_LENGTH = re.compile(r"[0-9]{1,12}")
_STATUS = re.compile(r"[0-9]{3}")  # ASCII only: str.isdigit() also accepts '²', which int() rejects


class StreamConnectError(OSError):
    """The connection (TCP or TLS) could not be set up, or the request could not be sent."""


class StreamProtocolError(OSError):
    """The server's response broke HTTP/1.1 framing, or the connection ended inside a framed body."""


class StreamingResponse:
    """Status, headers and a body read piece by piece; close() it when done (or use it as a context manager)."""

    def __init__(self, sock: socket.socket, status: int, headers: dict[str, str], buffered: bytes):
        self._sock = sock
        self.status = status
        self.headers = headers
        self._buffer = bytearray(buffered)

    def __enter__(self) -> StreamingResponse:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            return

    def iter_body(self) -> Iterator[bytes]:
        """The body's bytes as they arrive, without framing. Ends at the end of the body.

        Raises:
            socket.timeout: nothing arrived within the read timeout.
            StreamProtocolError: the connection ended inside a chunked or sized body, or bad chunk framing.
            OSError: the connection broke.
        """
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            yield from self._chunked()
        elif "content-length" in self.headers:
            length = self.headers["content-length"]
            if not _LENGTH.fullmatch(length):
                raise StreamProtocolError("malformed Content-Length")
            yield from self._sized(int(length))
        else:
            yield from self._until_close()

    def read(self, limit: int) -> bytes:
        """Up to `limit` bytes of the body (for error bodies)."""
        collected = bytearray()
        for piece in self.iter_body():
            collected += piece
            if len(collected) >= limit:
                break
        return bytes(collected[:limit])

    # --- body framings ---------------------------------------------------------------------------------------

    def _recv(self) -> bytes:
        return self._sock.recv(_READ_SIZE)

    def _until_close(self) -> Iterator[bytes]:
        if self._buffer:
            yield bytes(self._buffer)
            self._buffer.clear()
        while data := self._recv():
            yield data

    def _sized(self, length: int) -> Iterator[bytes]:
        remaining = length
        if self._buffer:
            piece = bytes(self._buffer[:remaining])
            self._buffer.clear()
            remaining -= len(piece)
            yield piece
        while remaining > 0:
            data = self._recv()
            if not data:
                raise StreamProtocolError("connection closed before the end of the body")
            piece = data[:remaining]
            remaining -= len(piece)
            yield piece

    def _chunked(self) -> Iterator[bytes]:
        buffer = self._buffer
        left = 0  # bytes of the current chunk's data still to come
        while True:
            if left:
                if buffer:
                    piece = bytes(buffer[:left])
                    del buffer[: len(piece)]
                    left -= len(piece)
                    yield piece
                    continue
            else:
                end = buffer.find(b"\r\n")
                if end >= 0:
                    line = bytes(buffer[:end])
                    if not line:  # the CRLF that closes a chunk's data
                        del buffer[:2]
                        continue
                    try:
                        size = int(line.split(b";", 1)[0], 16)
                    except ValueError:
                        raise StreamProtocolError("bad chunk size line") from None
                    del buffer[: end + 2]
                    if size == 0:
                        return
                    left = size
                    continue
                if len(buffer) > 1024:
                    raise StreamProtocolError("chunk size line too long")
            data = self._recv()
            if not data:
                raise StreamProtocolError("connection closed inside a chunked body")
            buffer += data


def post_stream(
    url: str, body: bytes, headers: dict[str, str], connect_timeout: float, read_timeout: float
) -> StreamingResponse:
    """POST `body` to `url` and return once the response head is in.

    Raises:
        StreamConnectError: could not connect, set up TLS, or send the request (nothing reached the server).
        socket.timeout: the response head did not arrive within the read timeout.
        StreamProtocolError: the response head is malformed, or the connection closed before it.
        OSError: the connection broke while reading the head.
    """
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as exc:
        raise StreamConnectError(f"connect failed: {type(exc).__name__}") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if https:
            sock = _tls_context().wrap_socket(sock, server_hostname=host)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = host if parts.port is None else f"{host}:{port}"
        lines = [
            f"POST {target} HTTP/1.1",
            f"Host: {host_header}",
            f"Content-Length: {len(body)}",
            "Connection: close",
            "Accept-Encoding: identity",
        ]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    except OSError as exc:
        sock.close()
        raise StreamConnectError(f"sending the request failed: {type(exc).__name__}") from exc
    sock.settimeout(read_timeout)
    try:
        status, response_headers, rest = _read_head(sock)
    except BaseException:
        sock.close()
        raise
    return StreamingResponse(sock, status, response_headers, rest)


def _read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(_READ_SIZE)
        if not data:
            raise StreamProtocolError("connection closed before the response head")
        buffer += data
        if len(buffer) > _MAX_HEAD_BYTES:
            raise StreamProtocolError("response head too large")
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = lines[0].split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not _STATUS.fullmatch(fields[1]):
        raise StreamProtocolError("malformed status line")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(fields[1]), headers, rest


def _tls_context() -> ssl.SSLContext:
    global _TLS_CONTEXT
    if _TLS_CONTEXT is None:
        _TLS_CONTEXT = ssl.create_default_context()
    return _TLS_CONTEXT
