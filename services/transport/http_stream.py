"""A minimal HTTP/1.1 client for one long streaming POST (the Dify SSE call), lean on the hot path.

httpx's per-read cost (httpcore + h11) was measured at about 120 us of CPU per network read, the largest cost
of relaying a delta (BENCHMARKS.md). Here a read is one recv() and a push decode of the body framing, which the
read pump (transport/read_pump.py) can also drive. Only what the streaming call needs: http and https,
Content-Length / chunked / read-to-close bodies, one request per connection, identity encoding, timeouts as
socket timeouts.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator
from urllib.parse import urlsplit

from utils.tls import default_tls_context

_MAX_HEAD_BYTES = 64 * 1024
READ_SIZE = 64 * 1024
_LENGTH = re.compile(r"[0-9]{1,12}")
# A chunk size (hex, at most 16 digits), extensions after ';', optional whitespace: RFC 9112 §7.1.
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_MAX_LINE_BYTES = 4096
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(r"\r?\n")
_STATUS = re.compile(r"[0-9]{3}")  # ASCII only: str.isdigit() also accepts '²', which int() rejects


class StreamConnectError(OSError):
    """The connection (TCP or TLS) could not be set up, or the request could not be sent."""


class StreamProtocolError(OSError):
    """The server's response broke HTTP/1.1 framing, or the connection ended inside a framed body."""


class StreamingResponse:
    """Status, headers and a body read piece by piece; close() it when done (or use it as a context manager).

    The body can be read here (`read_some`, blocking on the socket) or by whoever waits on `socket` for it and
    passes each recv() to `feed`: both go through the same decoder, so they can take turns on one body.
    """

    def __init__(self, sock: socket.socket, status: int, headers: dict[str, str], buffered: bytes):
        self.socket = sock
        self.status = status
        self.headers = headers
        self.buffered = buffered  # body bytes that came in with the head, not yet fed
        self._decoder: _BodyDecoder | None = None

    def __enter__(self) -> StreamingResponse:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.socket.close()
        except OSError:
            return

    @property
    def complete(self) -> bool:
        """True once the whole body has been fed (its framing says it ended, or the connection closed)."""
        return self._decoder is not None and self._decoder.complete

    def feed(self, data: bytes) -> bytes:
        """The body bytes in `data`, freshly received from the socket (b"" when the connection closed).

        Raises:
            StreamProtocolError: the connection ended inside a chunked or sized body, or bad framing.
        """
        if self._decoder is None:
            self._decoder = body_decoder(self.headers)
        return self._decoder.feed(data)

    def read_some(self) -> bytes:
        """Body bytes from what came with the head, or else from one blocking recv(); b"" once `complete`.

        Raises:
            socket.timeout: nothing arrived within the read timeout.
            StreamProtocolError: see `feed`.
            OSError: the connection broke.
        """
        if self.complete:
            return b""
        if self.buffered:
            data, self.buffered = self.buffered, b""
        else:
            data = self.socket.recv(READ_SIZE)
        return self.feed(data)

    def iter_body(self) -> Iterator[bytes]:
        """The body's bytes as they arrive, without framing. Ends at the end of the body (raises as read_some)."""
        while not self.complete:
            piece = self.read_some()
            if piece:
                yield piece

    def read(self, limit: int) -> bytes:
        """Up to `limit` bytes of the body (for error bodies)."""
        collected = bytearray()
        for piece in self.iter_body():
            collected += piece
            if len(collected) >= limit:
                break
        return bytes(collected[:limit])


# --- body framings: push decoders, fed what each recv() returned ----------------------------------------------


class _BodyDecoder:
    complete = False

    def feed(self, data: bytes) -> bytes:
        raise NotImplementedError


class _UntilClose(_BodyDecoder):
    def feed(self, data: bytes) -> bytes:
        if not data:
            self.complete = True
        return data


class _Sized(_BodyDecoder):
    def __init__(self, length: int):
        self.remaining = length
        self.complete = length == 0

    def feed(self, data: bytes) -> bytes:
        if self.complete:
            return b""
        if not data:
            raise StreamProtocolError("connection closed before the end of the body")
        piece = data[: self.remaining]
        self.remaining -= len(piece)
        self.complete = self.remaining == 0
        return piece


class _Chunked(_BodyDecoder):
    """RFC 9112 §7.1: size line (hex, optional extensions), data, CRLF; ..., a zero-size chunk, trailer fields, an
    empty line. Anything else is a framing error (tests/test_http_stream.py checks it against h11)."""

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._state = self._SIZE
        self._left = 0  # bytes of the current chunk's data still to come

    def feed(self, data: bytes) -> bytes:
        if self.complete:
            return b""
        if not data:
            raise StreamProtocolError("connection closed inside a chunked body")
        buffer = self._buffer
        buffer += data
        out = bytearray()
        while buffer and not self.complete:
            if self._state == self._DATA:
                piece = buffer[: self._left]
                del buffer[: len(piece)]
                self._left -= len(piece)
                out += piece
                if not self._left:
                    self._state = self._DATA_END
                continue
            line = self._line(buffer)
            if line is None:
                break
            if self._state == self._DATA_END:
                if line:
                    raise StreamProtocolError("chunk data not followed by CRLF")
                self._state = self._SIZE
            elif self._state == self._SIZE:
                match = _CHUNK_SIZE.fullmatch(line)
                if match is None:
                    raise StreamProtocolError("bad chunk size line")
                self._left = int(match.group(1), 16)
                self._state = self._DATA if self._left else self._TRAILER
            elif not line:  # the empty line that ends the trailer section, and the body
                self.complete = True
        return bytes(out)

    @staticmethod
    def _line(buffer: bytearray) -> bytes | None:
        """The next CRLF-terminated line (taken out of `buffer`), or None until it is all in."""
        end = buffer.find(b"\r\n")
        if end < 0:
            if len(buffer) > _MAX_LINE_BYTES:
                raise StreamProtocolError("chunk line too long")
            return None
        line = bytes(buffer[:end])
        del buffer[: end + 2]
        return line


def body_decoder(headers: dict[str, str]) -> _BodyDecoder:
    """The push decoder of a response body with these (lower-cased) headers: chunked, sized or until-close."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _Chunked()
    if "content-length" in headers:
        length = headers["content-length"]
        if not _LENGTH.fullmatch(length):
            raise StreamProtocolError("malformed Content-Length")
        return _Sized(int(length))
    return _UntilClose()


def post_stream(
    url: str,
    body: bytes | None,
    headers: dict[str, str],
    connect_timeout: float,
    read_timeout: float,
    tls: ssl.SSLContext | None = None,
) -> StreamingResponse:
    """POST `body` to `url` (GET when `body` is None) and return once the response head is in (https with `tls`,
    else the system's CAs).

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
            sock = (tls or default_tls_context()).wrap_socket(sock, server_hostname=host)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = host if parts.port is None else f"{host}:{port}"
        lines = [
            f"{'GET' if body is None else 'POST'} {target} HTTP/1.1",
            f"Host: {host_header}",
            "Connection: close",
            "Accept-Encoding: identity",
        ]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{name}: {value}" for name, value in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
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
    while (parts := split_head(buffer)) is None:
        data = sock.recv(READ_SIZE)
        if not data:
            raise StreamProtocolError("connection closed before the response head")
        buffer += data
        if len(buffer) > _MAX_HEAD_BYTES:
            raise StreamProtocolError("response head too large")
    head, rest = parts
    status, headers = parse_head(head)
    return status, headers, rest


def split_head(buffer: bytes) -> tuple[bytes, bytes] | None:
    """(head, what follows it) once `buffer` holds the whole response head, else None. Lines may end in CRLF or,
    as some servers send, a bare LF (RFC 9112 §2.2)."""
    end = _HEAD_END.search(buffer)
    return None if end is None else (buffer[: end.start()], buffer[end.end() :])


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and (lower-cased) headers of a response head, without its final blank line.

    Raises:
        StreamProtocolError: a malformed status line.
    """
    lines = _LINE_END.split(head.decode("latin-1"))
    fields = lines[0].split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not _STATUS.fullmatch(fields[1]):
        raise StreamProtocolError("malformed status line")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(fields[1]), headers
