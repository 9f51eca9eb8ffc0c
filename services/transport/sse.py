"""An incremental Server-Sent Events parser (the WHATWG event-stream rules), fed raw bytes as they arrive.

Lines end in CRLF, LF or CR; `field: value` lines build an event; a blank line dispatches it; lines starting
with ':' are comments. Bytes are decoded as UTF-8 only once a whole line is in, so a multi-byte character or a
JSON object split across network reads is reassembled before anyone looks at it.
"""

from __future__ import annotations

from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event: `event` is "message" unless the stream named it; `data` joins the data lines."""

    event: str
    data: str
    id: str | None = None


class SSEParser:
    """Feed bytes with `feed()`; it returns the events completed by those bytes, in order."""

    __slots__ = ("_buffer", "_data", "_event", "_id", "_started", "_pending_cr")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._started = False
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume `chunk` and return every event it completes."""
        if not chunk:
            return []
        if self._pending_cr:
            # A CR ended the previous chunk: drop the LF that completes a CRLF split across reads.
            self._pending_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        buffer = self._buffer + chunk
        if not self._started:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._buffer = buffer
                return []
            self._started = True
            if buffer.startswith(_BOM):
                buffer = buffer[len(_BOM) :]
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):
                self._pending_cr = True
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        cut = buffer.rfind(b"\n")
        if cut < 0:
            self._buffer = buffer
            return []
        self._buffer = buffer[cut + 1 :]
        events: list[SSEEvent] = []
        for line in buffer[:cut].split(b"\n"):
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, raw: bytes) -> SSEEvent | None:
        if not raw:
            return self._dispatch()
        if raw[0] == 0x3A:  # ':' comment
            return None
        line = raw.decode("utf-8", errors="replace")
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        # "retry" and unknown field names are ignored, as the spec says.
        return None

    def _dispatch(self) -> SSEEvent | None:
        # Unlike a browser, a named event without data (Dify's `event: ping`) is dispatched, so keep-alives show.
        if not self._data and not self._event:
            return None
        event = SSEEvent(self._event or "message", "\n".join(self._data), self._id)
        self._data = []
        self._event = ""
        return event

    def pending_bytes(self) -> int:
        """How many bytes of an unfinished line are buffered (an unterminated frame at end of stream)."""
        return len(self._buffer)
