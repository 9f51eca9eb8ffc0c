"""Dify Service API client: the streaming chat call turned into typed events, and the small side endpoints.

`stream_chat()` yields one list of events per network read (possibly empty, e.g. a ping), so the caller can
write each read's deltas to Redis in one batch and check its own deadline between reads. Its socket is read by the
process's read pump (transport/read_pump.py): a `relay` callback may handle the plain batches right there, in the
pump's thread, and only the rest wake the caller. Every way the call can fail raises a `DifyError` subclass; a
stream that ends without `message_end` or `error` raises `DifyStreamCut`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import orjson

from services.dify.transport.http_stream import StreamConnectError, StreamingResponse, post_stream
from services.dify.transport.read_pump import ReadPump
from services.dify.transport.sse import SSEParser

logger = logging.getLogger(__name__)

TEXT_EVENTS = frozenset({"message", "agent_message"})
END_EVENT = "message_end"
ERROR_EVENT = "error"
REPLACE_EVENT = "message_replace"
FILE_EVENT = "message_file"
THOUGHT_EVENT = "agent_thought"
WORKFLOW_FINISHED = "workflow_finished"
# Events that carry nothing for a text relay; anything not listed anywhere is ignored too, at debug level.
_QUIET_EVENTS = frozenset(
    {
        "ping",
        "tts_message",
        "tts_message_end",
        "workflow_started",
        "node_started",
        "node_finished",
        "node_retry",
        "iteration_started",
        "iteration_next",
        "iteration_completed",
        "loop_started",
        "loop_next",
        "loop_completed",
        "parallel_branch_started",
        "parallel_branch_finished",
        "agent_log",
        "text_chunk",
        "text_replace",
    }
)
_RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
_MAX_ERROR_BODY = 2048
_PROCESS_PUMP = ReadPump()


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


@dataclass(slots=True)
class ChatRequest:
    """One call to `POST /chat-messages`."""

    query: str
    user: str
    inputs: dict = field(default_factory=dict)
    conversation_id: str = ""
    files: list = field(default_factory=list)

    def body(self) -> dict:
        body = {
            "query": self.query,
            "inputs": self.inputs,
            "response_mode": "streaming",
            "user": self.user,
            "auto_generate_name": True,
        }
        if self.conversation_id:
            body["conversation_id"] = self.conversation_id
        if self.files:
            body["files"] = self.files
        return body


@dataclass(slots=True)
class DifyEvent:
    """One decoded SSE event: `kind` is Dify's `event` field; `data` the whole JSON object."""

    kind: str
    data: dict

    @property
    def answer(self) -> str:
        return self.data.get("answer") or ""

    def get(self, name: str, default=None):
        return self.data.get(name, default)


Relay = Callable[[list[DifyEvent]], bool]


def decode_event(event_name: str, payload: str) -> DifyEvent | None:
    """Turn one SSE frame into a DifyEvent; None for pings, empty frames and data that is not a JSON object."""
    if event_name == "ping" or not payload:
        return None
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        logger.warning("ignored an SSE frame whose data is not JSON (%d bytes)", len(payload))
        return None
    if not isinstance(data, dict):
        logger.warning("ignored an SSE frame whose data is not a JSON object")
        return None
    kind = data.get("event") or (event_name if event_name != "message" else "")
    if not isinstance(kind, str) or not kind:
        logger.warning("ignored an SSE frame without an event name")
        return None
    return DifyEvent(kind, data)


class DifyClient:
    """One per process; thread-safe. The streaming chat call has its own lean HTTP client (transport/http_stream.py);
    the other endpoints share an httpx connection pool."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_retries: int = 2,
        retry_backoff: float = 1.0,
        pump: ReadPump = _PROCESS_PUMP,
    ):
        self.pump = pump
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._chat_url = base_url.rstrip("/") + "/chat-messages"
        self._stream_headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
        }
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=10.0, pool=connect_timeout)
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            trust_env=False,
        )

    def close(self) -> None:
        self._http.close()

    def stream_chat(self, request: ChatRequest, relay: Relay | None = None) -> Iterator[list[DifyEvent]]:
        """Run a streaming chat; yields the events of each network read. Ends after `message_end` or raises.

        `relay(batch)`, if given, runs in the read pump's thread for each read before the last one; when it
        returns True it has handled the batch and the caller is not woken for it. It must not block.

        Raises:
            DifyHTTPError, DifyConnectionError, DifyTimeout, DifyStreamError, DifyStreamCut.
        """
        body = orjson.dumps(request.body())
        attempt = 0
        while True:
            try:
                yield from self._stream_once(body, relay)
                return
            except (DifyHTTPError, DifyConnectionError) as exc:
                retryable = isinstance(exc, DifyConnectionError) or exc.status in _RETRYABLE_STATUS
                if not retryable or attempt >= self.max_retries:
                    raise
                attempt += 1
                delay = self.retry_backoff * (2 ** (attempt - 1)) * (0.5 + random.random())
                logger.warning(
                    "Dify call failed (%s), retry %d of %d in %.1fs", exc.code, attempt, self.max_retries, delay
                )
                time.sleep(delay)

    def _stream_once(self, body: bytes, relay: Relay | None) -> Iterator[list[DifyEvent]]:
        try:
            response = post_stream(self._chat_url, body, self._stream_headers, self.connect_timeout, self.read_timeout)
        except StreamConnectError as exc:
            raise DifyConnectionError(f"could not reach Dify: {exc}") from exc
        except TimeoutError as exc:
            raise DifyTimeout("Dify sent no response within the read timeout") from exc
        except OSError as exc:
            raise DifyConnectionError(f"Dify closed the connection before answering: {type(exc).__name__}") from exc
        with response:
            if response.status != 200:
                try:
                    raw = response.read(_MAX_ERROR_BODY)
                except OSError:
                    raw = b""
                raise _http_error(response.status, raw)
            events = _EventReader()
            try:
                while not events.stopped and not response.complete:
                    yield self._next_batch(response, events, relay)
            except TimeoutError as exc:
                raise DifyTimeout("Dify sent nothing within the read timeout") from exc
            except OSError as exc:
                raise DifyStreamCut(f"connection to Dify broke mid-stream: {type(exc).__name__}") from exc
            if events.failure is not None:
                raise events.failure
            if events.ended:
                return
        raise DifyStreamCut("Dify closed the stream before message_end")

    def _next_batch(self, response: StreamingResponse, events: _EventReader, relay: Relay | None) -> list[DifyEvent]:
        """The events of the next read that `relay` does not handle (or of the last read)."""
        if response.buffered:  # came in with the response head
            return events.feed(response.read_some())
        handed_back: list[list[DifyEvent]] = []

        def on_data(data: bytes) -> bool:
            batch = events.feed(response.feed(data))
            if events.stopped or response.complete or relay is None or not relay(batch):
                handed_back.append(batch)
                return False
            return True

        self.pump.wait(response.socket, on_data, self.read_timeout)
        return handed_back[0] if handed_back else []

    def parameters(self, timeout: float = 10.0) -> dict:
        """The app's `/parameters` (opening statement, suggested questions, declared inputs, upload limits).

        Raises:
            DifyHTTPError, DifyConnectionError, DifyTimeout.
        """
        response = self._request("GET", "parameters", "/parameters", timeout=timeout)
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise DifyHTTPError(response.status_code, "malformed", "Dify /parameters is not JSON") from None
        return data if isinstance(data, dict) else {}

    def upload_file(self, data: bytes, filename: str, mime_type: str, user: str) -> str:
        """Upload a file for `user` (`POST /files/upload`); returns its id for `files[].upload_file_id`.

        Raises:
            DifyHTTPError, DifyConnectionError, DifyTimeout.
        """
        response = self._request(
            "POST", "files/upload", "file upload", files={"file": (filename, data, mime_type)}, data={"user": user}
        )
        try:
            file_id = orjson.loads(response.content).get("id")
        except (orjson.JSONDecodeError, AttributeError):
            file_id = None
        if not isinstance(file_id, str) or not file_id:
            raise DifyHTTPError(response.status_code, "malformed", "Dify upload answered without a file id")
        return file_id

    def feedback(self, message_id: str, rating: str | None, user: str, content: str = "") -> None:
        """Rate a message (`like`, `dislike`, or None to withdraw), as the user who got it.

        Raises:
            DifyHTTPError, DifyConnectionError, DifyTimeout.
        """
        body = {"rating": rating, "user": user, "content": content}
        self._request("POST", f"messages/{message_id}/feedbacks", "feedback", json=body, timeout=10.0)

    def _request(self, method: str, path: str, what: str, timeout: float = 60.0, **kwargs) -> httpx.Response:
        """One plain (non-streaming) call, its failures mapped to our errors.

        Raises:
            DifyHTTPError (any status but 200/201), DifyConnectionError, DifyTimeout.
        """
        try:
            response = self._http.request(method, path, timeout=timeout, **kwargs)
        except httpx.TimeoutException as exc:
            raise DifyTimeout(f"Dify {what} timed out") from exc
        except httpx.HTTPError as exc:
            raise DifyConnectionError(f"could not reach Dify: {type(exc).__name__}") from exc
        if response.status_code not in (200, 201):
            raise _http_error(response.status_code, response.content[:_MAX_ERROR_BODY])
        return response

    def stop(self, task_id: str, user: str) -> None:
        """Ask Dify to stop a running task (best effort; failures are logged, not raised)."""
        try:
            response = self._http.post(f"chat-messages/{task_id}/stop", json={"user": user}, timeout=5.0)
            if response.status_code >= 400:
                logger.warning("Dify stop returned HTTP %d", response.status_code)
        except httpx.HTTPError as exc:
            logger.warning("Dify stop failed: %s", type(exc).__name__)


class _EventReader:
    """Turns the SSE body, read by read, into batches of events; stops at `message_end` or an `error` event."""

    __slots__ = ("_parser", "ended", "failure")

    def __init__(self) -> None:
        self._parser = SSEParser()
        self.ended = False
        self.failure: DifyStreamError | None = None

    @property
    def stopped(self) -> bool:
        return self.ended or self.failure is not None

    def feed(self, body: bytes) -> list[DifyEvent]:
        """The events of one read worth passing on (pings and quiet events left out)."""
        batch = []
        if self.stopped:
            return batch
        for sse in self._parser.feed(body):
            event = decode_event(sse.event, sse.data)
            if event is None:
                continue
            if event.kind == ERROR_EVENT:
                self.failure = DifyStreamError(
                    str(event.get("message") or "Dify reported an error"),
                    code=str(event.get("code") or "stream_error"),
                    status=event.get("status"),
                )
                break
            if event.kind not in _QUIET_EVENTS:
                batch.append(event)
            if event.kind == END_EVENT:
                self.ended = True
                break
        return batch


def _http_error(status: int, raw: bytes) -> DifyHTTPError:
    """Read Dify's `{code, message, status}` error body (or whatever a proxy sent) into a DifyHTTPError."""
    code, message = "", ""
    try:
        data = orjson.loads(raw)
        if isinstance(data, dict):
            code, message = str(data.get("code") or ""), str(data.get("message") or "")
    except orjson.JSONDecodeError:
        message = raw[:200].decode("utf-8", errors="replace").strip()
    return DifyHTTPError(status, code, message or f"HTTP {status}")
