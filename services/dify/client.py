"""Dify Service API client: the streaming chat call turned into typed events (one list per network read, read by
the process's read pump), and the small side endpoints. Every failure raises a `BackendError` subclass; a stream
that ends without `message_end` or `error` raises `BackendStreamCut`. A run's stream is checked against Dify's run
record where the stream alone would mislead (services/dify/run_records.py).
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode, urlsplit

import httpx
import orjson

from services.dify.events import DifyEvent, EventReader
from services.dify.run_records import QuietRun, RunRecords
from services.transport import PROCESS_PUMP, open_backend_stream
from services.transport.errors import (
    BackendConnectionError,
    BackendHTTPError,
    BackendStreamCut,
    BackendTimeout,
    access_problem_of,
    http_error,
    never_taken,
)
from services.transport.read_pump import ReadPump
from services.transport.trace import trace_headers
from utils.http import outgoing_client
from utils.tls import default_tls_context

if TYPE_CHECKING:
    from config.settings import DifySettings

logger = logging.getLogger(__name__)

_RETRYABLE_STATUS = frozenset({429, 502, 503, 504})  # for a GET; a POST only when it was never taken (errors.py)
_MAX_ERROR_BODY = 2048


WORKFLOW, COMPLETION = "workflow", "completion"
_RECORD_TIMEOUT = 10.0
# A run followed from a form's submission that brings only pings is checked against its record this soon: a resumed
# run may end 0.1 s after the submission, and a real 1.16.0 relayed none of a resumed workflow app's events to the
# listener that had just subscribed.
RESUMED_QUIET_SECONDS = 3.0


@dataclass(slots=True)
class ChatRequest:
    """One question to the app, as the call its type takes (docs/protocol.md, Dify): chat-like apps `POST
    /chat-messages`, workflow apps `POST /workflows/run` with the question in the input `workflow_input`,
    completion apps `POST /completion-messages` with the question in `inputs.query`."""

    query: str
    user: str
    inputs: dict = field(default_factory=dict)
    conversation_id: str = ""
    files: list = field(default_factory=list)
    app_type: str = "chat"
    workflow_input: str = "query"

    @property
    def path(self) -> str:
        return {WORKFLOW: "/workflows/run", COMPLETION: "/completion-messages"}.get(self.app_type, "/chat-messages")

    def body(self) -> dict:
        body: dict = {"inputs": self.inputs, "response_mode": "streaming", "user": self.user}
        if self.app_type == WORKFLOW:
            body["inputs"] = {**self.inputs, self.workflow_input: self.query}
        elif self.app_type == COMPLETION:
            body["inputs"] = {**self.inputs, "query": self.query}
        else:
            body.update(query=self.query, auto_generate_name=True)
            if self.conversation_id:
                body["conversation_id"] = self.conversation_id
        if self.files:
            body["files"] = self.files
        return body


Relay = Callable[[list[DifyEvent]], bool]


class DifyClient:
    """One per process; thread-safe. The streaming chat call has its own lean HTTP client (transport/http_stream.py);
    the other endpoints share an httpx connection pool."""

    def __init__(self, app: DifySettings, *, pump: ReadPump = PROCESS_PUMP, tls: ssl.SSLContext | None = None):
        """`app`: the Dify app's address and key, and how it is called (timeouts, retries, the quiet-run check)."""
        base_url, api_key, connect_timeout = app.base_url, app.api_key, app.connect_timeout
        self.pump = pump
        self.quiet_run_seconds = app.quiet_run_seconds  # 0: a run's quiet stream is never checked against its record
        self.records = RunRecords(self.run_record)  # a run's quiet or outputless stream checked against its record
        self.tls = tls or default_tls_context()
        self.max_retries = app.max_retries
        self.retry_backoff = app.retry_backoff
        self.connect_timeout = connect_timeout
        self.read_timeout = app.read_timeout
        self._base_url = base_url.rstrip("/")
        self._stream_headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
        }
        timeout = httpx.Timeout(connect=connect_timeout, read=app.read_timeout, write=10.0, pool=connect_timeout)
        self._http = outgoing_client(
            timeout,
            follow_redirects=False,
            headers={"Authorization": f"Bearer {api_key}"},
            tls=self.tls,
            base_url=base_url.rstrip("/") + "/",
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    @property
    def host(self) -> str:
        """The Dify API's host (and port), for an operator."""
        return urlsplit(self._base_url).netloc

    def close(self) -> None:
        self._http.close()

    def stream_chat(
        self, request: ChatRequest, relay: Relay | None = None, *, trace_id: str = ""
    ) -> Iterator[list[DifyEvent]]:
        """Run a streaming chat; yields the events of each network read. Ends after the answer's end (EventReader)
        or raises. `trace_id`: the message's trace, carried by each try (services/transport/trace.py).

        `relay(batch)`, if given, runs in the read pump's thread for each read before the last one; when it
        returns True it has handled the batch and the caller is not woken for it. It must not block.

        Raises:
            BackendHTTPError, BackendConnectionError, BackendTimeout, BackendStreamError, BackendStreamCut.
        """
        url, body = self._base_url + request.path, orjson.dumps(request.body())
        yield from self._with_retries(
            lambda: self._stream_once(url, body, EventReader(request.app_type), relay, trace_id=trace_id),
            idempotent=False,
        )

    def stream_run(
        self,
        run_id: str,
        user: str,
        relay: Relay | None = None,
        *,
        snapshot: bool = False,
        continue_on_pause: bool = False,
        on_open: Callable[[], bool] | None = None,
        trace_id: str = "",
    ) -> Iterator[list[DifyEvent]]:
        """Follow a chatflow's or workflow's run (`GET /workflow/{run_id}/events`), as `stream_chat` otherwise; ends
        at `workflow_finished` or `workflow_paused`. Dify relays only what the run publishes from then on; with
        `snapshot` (`include_state_snapshot`) it first rebuilds what the run did: `workflow_started`, ONE
        `message_replace` with the answer it saved at a pause (`""` mid-run), the nodes run, and a pause's form with
        its raw template. A finished run gives its `workflow_finished` alone. `continue_on_pause` keeps Dify's side
        open past a pause. `on_open()`, if given, runs once Dify answered 200 (so the reader is subscribed): a form
        submitted there cannot resume the run before we listen; when it returns False, nothing is read.

        Raises:
            BackendHTTPError (404: no such run, or not this user's), BackendConnectionError, BackendTimeout,
            BackendStreamError, BackendStreamCut.
        """
        query = {"user": user}
        if snapshot:
            query["include_state_snapshot"] = "true"
        if continue_on_pause:
            query["continue_on_pause"] = "true"
        url = f"{self._base_url}/workflow/{quote(run_id, safe='')}/events?{urlencode(query)}"
        yield from self._with_retries(
            lambda: self._stream_once(
                url,
                None,
                EventReader(WORKFLOW, run_id),
                relay,
                on_open,
                follows_pauses=continue_on_pause,
                trace_id=trace_id,
            ),
            idempotent=True,
        )

    def run_record(self, run_id: str, timeout: float = _RECORD_TIMEOUT) -> dict:
        """Dify's record of a chatflow's or workflow's run (`GET /workflows/run/{id}`): its `status` (running,
        paused, succeeded, partial-succeeded, failed, stopped), `outputs` once it ended, `error`.

        Raises:
            BackendHTTPError (404: no such run of this app), BackendConnectionError, BackendTimeout.
        """
        return self._get_object(f"workflows/run/{quote(run_id, safe='')}", timeout)

    def human_input_form(self, form_token: str, timeout: float = 10.0) -> dict:
        """A paused run's form (`GET /form/human_input/{token}`): form_content, inputs, user_actions,
        expiration_time.

        Raises:
            BackendHTTPError (404 unknown; 412 answered or expired), BackendConnectionError, BackendTimeout.
        """
        return self._get_object(f"form/human_input/{quote(form_token, safe='')}", timeout)

    def submit_human_input(self, form_token: str, inputs: dict, action: str, user: str) -> None:
        """Answer a paused run's form (`POST /form/human_input/{token}`) as the run's own `user`; the run goes on.

        Raises:
            BackendHTTPError (412: answered already or expired; 400: an input Dify refused), BackendConnectionError,
            BackendTimeout.
        """
        body = {"inputs": inputs, "action": action, "user": user}
        self._request("POST", f"form/human_input/{quote(form_token, safe='')}", "form submission", json=body)

    def _with_retries(
        self, stream: Callable[[], Iterator[list[DifyEvent]]], idempotent: bool
    ) -> Iterator[list[DifyEvent]]:
        """Retry a call that failed before its stream began: 429/502/503/504 and connection errors for a GET; for a
        POST (`idempotent` false) only what cannot have reached Dify (429, 503, no connection, request not sent)."""
        attempt = 0
        while True:
            try:
                yield from stream()
                return
            except (BackendHTTPError, BackendConnectionError) as exc:
                if idempotent:
                    retryable = isinstance(exc, BackendConnectionError) or exc.status in _RETRYABLE_STATUS
                else:
                    retryable = never_taken(exc)
                if not retryable or attempt >= self.max_retries:
                    raise
                attempt += 1
                delay = self.retry_backoff * (2 ** (attempt - 1)) * (0.5 + random.random())
                logger.warning(
                    "Dify call failed (%s), retry %d of %d in %.1fs", exc.code, attempt, self.max_retries, delay
                )
                time.sleep(delay)

    def _stream_once(
        self,
        url: str,
        body: bytes | None,
        reader: EventReader,
        relay: Relay | None,
        on_open: Callable[[], bool] | None = None,
        follows_pauses: bool = False,
        trace_id: str = "",
    ) -> Iterator[list[DifyEvent]]:
        headers = {**self._stream_headers, **trace_headers(trace_id)} if trace_id else self._stream_headers
        stream = open_backend_stream(
            url, body, headers, self.connect_timeout, self.read_timeout, self.tls, self.pump, "Dify"
        )
        with stream:
            if on_open is not None and not on_open():
                return
            quiet = None
            if reader.follows_a_run and self.quiet_run_seconds > 0:
                first = RESUMED_QUIET_SECONDS if on_open is not None else None  # on_open resumed the run
                quiet = QuietRun(self.quiet_run_seconds, follows_pauses, first)
            try:
                while not reader.stopped and not stream.complete:
                    wake_at = quiet.due_at(reader) if quiet else None
                    batch = stream.next_batch(reader.read, lambda: reader.stopped, relay, wake_at)
                    if quiet is not None and not batch and time.monotonic() >= quiet.due_at(reader):
                        batch = self.records.checked(quiet, reader)
                    yield self.records.with_kept_outputs(batch, reader)
            except TimeoutError as exc:
                raise BackendTimeout("Dify sent nothing within the read timeout") from exc
            except OSError as exc:
                raise BackendStreamCut(f"connection to Dify broke mid-stream: {type(exc).__name__}") from exc
            if reader.failure is not None:
                raise reader.failure
            if reader.ended or reader.answer_ended:  # a chatflow's stream may close right after message_end
                return
        raise BackendStreamCut(f"Dify closed the stream before {reader.end_name}")

    def info(self, timeout: float = 10.0) -> dict:
        """The app's `/info` (name, description, tags, `mode`: its app type).

        Raises:
            BackendHTTPError, BackendConnectionError, BackendTimeout.
        """
        return self._get_object("info", timeout)

    def parameters(self, timeout: float = 10.0) -> dict:
        """The app's `/parameters` (opening statement, suggested questions, declared inputs, upload limits).

        Raises:
            BackendHTTPError, BackendConnectionError, BackendTimeout.
        """
        return self._get_object("parameters", timeout)

    def access_problem(self, timeout: float = 5.0) -> str:
        """Whether this app answers with this key (`GET /parameters`): "" when it does, else one line saying why
        not, in the words of the setting to fix (never the key)."""
        try:
            self.parameters(timeout)
        except (BackendHTTPError, BackendTimeout, BackendConnectionError) as exc:
            address = "DIFY_BASE_URL should be the app's Service API address, ending in /v1"
            return access_problem_of(exc, timeout, "DIFY_API_KEY", address, "Dify")
        return ""

    def _get_object(self, name: str, timeout: float) -> dict:
        """`GET /<name>` as a JSON object (empty if it is another JSON value)."""
        response = self._request("GET", name, f"/{name.split('/', 1)[0]}", timeout=timeout)
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise BackendHTTPError(response.status_code, "malformed", f"Dify /{name} is not JSON") from None
        return data if isinstance(data, dict) else {}

    def upload_file(self, data: bytes, filename: str, mime_type: str, user: str) -> str:
        """Upload a file for `user` (`POST /files/upload`); returns its id for `files[].upload_file_id`.

        Raises:
            BackendHTTPError, BackendConnectionError, BackendTimeout.
        """
        response = self._request(
            "POST", "files/upload", "file upload", files={"file": (filename, data, mime_type)}, data={"user": user}
        )
        try:
            file_id = orjson.loads(response.content).get("id")
        except (orjson.JSONDecodeError, AttributeError):
            file_id = None
        if not isinstance(file_id, str) or not file_id:
            raise BackendHTTPError(response.status_code, "malformed", "Dify upload answered without a file id")
        return file_id

    def suggested(self, message_id: str, user: str, timeout: float = 3.0) -> list[str]:
        """The questions Dify suggests after an answer (`GET /messages/{id}/suggested`), for apps that enable them.

        Raises:
            BackendHTTPError, BackendConnectionError, BackendTimeout.
        """
        path = f"messages/{quote(message_id, safe='')}/suggested"
        response = self._request("GET", path, "suggested questions", timeout=timeout, params={"user": user})
        try:
            data = orjson.loads(response.content).get("data")
        except (orjson.JSONDecodeError, AttributeError):
            data = None
        return [q for q in data if isinstance(q, str) and q.strip()] if isinstance(data, list) else []

    def feedback(self, message_id: str, rating: str | None, user: str, content: str = "") -> None:
        """Rate a message (`like`, `dislike`, or None to withdraw), as the user who got it.

        Raises:
            BackendHTTPError, BackendConnectionError, BackendTimeout.
        """
        body = {"rating": rating, "user": user, "content": content}
        self._request("POST", f"messages/{message_id}/feedbacks", "feedback", json=body, timeout=10.0)

    def _request(self, method: str, path: str, what: str, timeout: float = 60.0, **kwargs) -> httpx.Response:
        """One plain (non-streaming) call, its failures mapped to our errors.

        Raises:
            BackendHTTPError (any status but 200/201), BackendConnectionError, BackendTimeout.
        """
        try:
            response = self._http.request(method, path, timeout=timeout, **kwargs)
        except httpx.TimeoutException as exc:
            raise BackendTimeout(f"Dify {what} timed out") from exc
        except httpx.HTTPError as exc:
            raise BackendConnectionError(f"could not reach Dify: {type(exc).__name__}") from exc
        if response.status_code not in (200, 201):
            raise http_error(response.status_code, response.content[:_MAX_ERROR_BODY])
        return response

    def stop(self, task_id: str, user: str, app_type: str = "chat") -> None:
        """Ask Dify to stop a running task (best effort; failures are logged, not raised)."""
        path = {WORKFLOW: "workflows/tasks", COMPLETION: "completion-messages"}.get(app_type, "chat-messages")
        try:
            response = self._http.post(f"{path}/{quote(task_id, safe='')}/stop", json={"user": user}, timeout=5.0)
            if response.status_code >= 400:
                logger.warning("Dify stop returned HTTP %d", response.status_code)
        except httpx.HTTPError as exc:
            logger.warning("Dify stop failed: %s", type(exc).__name__)
