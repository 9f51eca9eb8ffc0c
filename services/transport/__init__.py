"""The streaming transport of a backend's call (Dify's, an OpenAI-compatible server's), behind one small interface:
`open_backend_stream()` POSTs the request and returns an `EventStream` whose body arrives as Server-Sent Events, read
by the process's read pump, or raises the backend's error.

It is hand-written (a lean HTTP/1.1 client, one read-pump thread for all streams, an incremental SSE parser)
because the benchmarks showed httpx's per-read cost and a thread waking per read to be the largest costs of
relaying a delta (BENCHMARKS.md §2). Nothing outside this package knows how.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from services.transport.errors import BackendConnectionError, BackendTimeout, http_error
from services.transport.http_stream import StreamConnectError, StreamingResponse, post_stream
from services.transport.read_pump import ReadPump
from services.transport.sse import SSEEvent, SSEParser

__all__ = ["EventStream", "SSEEvent", "StreamConnectError", "open_backend_stream", "PROCESS_PUMP"]

PROCESS_PUMP = ReadPump()
MAX_ERROR_BODY = 2048  # bytes of an error's body read


class EventStream:
    """One open streaming response: `status`, and the body as the SSE events of each network read.

    Errors while reading: TimeoutError (nothing arrived within the read timeout), OSError (the connection broke,
    or its HTTP framing did).
    """

    def __init__(self, response: StreamingResponse, read_timeout: float, pump: ReadPump):
        self._response = response
        self._read_timeout = read_timeout
        self._pump = pump
        self._parser = SSEParser()

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def complete(self) -> bool:
        """True once the whole body has arrived."""
        return self._response.complete

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._response.close()

    def read_body(self, limit: int) -> bytes:
        """Up to `limit` bytes of a (non-stream) body, e.g. an error's JSON; b"" if the connection broke."""
        try:
            return self._response.read(limit)
        except OSError:
            return b""

    def head_events(self) -> list[SSEEvent] | None:
        """The events of the body bytes that came in with the response head (once), or None when there were none:
        they are read here, in the caller's thread, and never reach the read pump."""
        if not self._response.buffered:
            return None
        return self._parser.feed(self._response.read_some())

    def next_batch(
        self,
        decode: Callable[[list[SSEEvent]], list],
        done: Callable[[], bool],
        relay: Callable[[list], bool] | None = None,
        wake_at: float | None = None,
    ) -> list:
        """The `decode`d events of the next read that `relay` does not handle (or of the last read, or once `done()`
        says the answer is over); [] at `wake_at` (time.monotonic()) if nothing else came. `relay(batch)` runs in
        the read pump's thread for the plain reads: when it returns True it has handled the batch, and the caller
        is not woken for it. It must not block.

        Raises:
            TimeoutError, OSError: see the class.
        """
        head = self.head_events()
        if head is not None:
            return decode(head)
        handed_back: list[list] = []

        def on_events(events) -> bool:
            batch = decode(events)
            if done() or self.complete or relay is None or not relay(batch):
                handed_back.append(batch)
                return False
            return True

        self.pump_events(on_events, wake_at)
        return handed_back[0] if handed_back else []

    def pump_events(self, on_events: Callable[[list[SSEEvent]], bool], wake_at: float | None = None) -> None:
        """Call `on_events` with the events of each network read (possibly none, e.g. a partial frame) in the read
        pump's thread, until it returns False, the body ends (the read that ends it is passed too) or `wake_at`
        (time.monotonic()) comes. `on_events` must not block: every stream of the process waits for it.

        Raises:
            TimeoutError, OSError: see the class; and whatever `on_events` raised.
        """
        response = self._response

        def on_data(data: bytes) -> bool:
            return on_events(self._parser.feed(response.feed(data))) and not response.complete

        self._pump.wait(response.socket, on_data, self._read_timeout, wake_at)


def open_backend_stream(
    url: str,
    body: bytes | None,
    headers: dict[str, str],
    connect_timeout: float,
    read_timeout: float,
    tls: ssl.SSLContext | None = None,
    pump: ReadPump = PROCESS_PUMP,
    backend: str = "the backend",
) -> EventStream:
    """A backend's streaming call (a POST of `body`, a GET when it is None), opened once the response head is in:
    200 and its body to read, or the backend's error.

    Raises:
        BackendConnectionError: nothing reached it (retried safely), or (`request_sent`) the connection ended after
            the request went whole: it may be answering it.
        BackendTimeout: no response head within the read timeout.
        BackendHTTPError: any status but 200 (its error body read).
    """
    try:
        stream = EventStream(post_stream(url, body, headers, connect_timeout, read_timeout, tls), read_timeout, pump)
    except StreamConnectError as exc:
        raise BackendConnectionError(f"could not reach {backend}: {exc}") from exc
    except TimeoutError as exc:
        raise BackendTimeout(f"{backend} sent no response within the read timeout") from exc
    except OSError as exc:  # the request was sent whole: the backend may be answering it
        raise BackendConnectionError(
            f"{backend} closed the connection before answering: {type(exc).__name__}", request_sent=True
        ) from exc
    if stream.status != 200:
        with stream:
            raise http_error(stream.status, stream.read_body(MAX_ERROR_BODY))
    return stream
