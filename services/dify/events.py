"""Dify's SSE events as typed values: the event names the gateway acts on, and a reader that turns the events of
one network read into a batch, stopping at the end of the answer (`message_end`; `workflow_finished` for a
chatflow or workflow run; `workflow_paused` for a run that waits for a person) or at an `error` event."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import orjson

from services.transport import SSEEvent
from services.transport.errors import BackendStreamError

logger = logging.getLogger(__name__)

MESSAGE_EVENT = "message"
AGENT_MESSAGE_EVENT = "agent_message"
END_EVENT = "message_end"
ERROR_EVENT = "error"
REPLACE_EVENT = "message_replace"
FILE_EVENT = "message_file"
THOUGHT_EVENT = "agent_thought"
WORKFLOW_STARTED = "workflow_started"
WORKFLOW_FINISHED = "workflow_finished"
RUN_ENDED = frozenset({"succeeded", "partial-succeeded", "failed", "stopped"})  # a run's statuses once it is over
WORKFLOW_TEXT = "text_chunk"  # a workflow app's answer delta, in data.text
RUN_APPS = frozenset({"advanced-chat", "workflow"})  # the app types whose answers are runs (re-attachable)
WORKFLOW_REPLACE = "text_replace"
REASONING_EVENT = "reasoning_chunk"
NODE_STARTED, NODE_FINISHED = "node_started", "node_finished"  # a run's steps (a slow one shows a status line)
INPUT_REQUIRED = "human_input_required"
PAUSED = "workflow_paused"  # the run waits for a person's input: the stream ends here
FORM_FILLED = "human_input_form_filled"  # a re-attached run: the form was answered, the run goes on
FORM_TIMEOUT = "human_input_form_timeout"  # ... or it expired unanswered, and the node's timeout path ran
# Events that carry nothing for a text relay; anything not listed anywhere is ignored too, at debug level.
QUIET_EVENTS = frozenset(
    {
        "ping",
        "tts_message",
        "tts_message_end",
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
    }
)


@dataclass(slots=True)
class DifyEvent:
    """One decoded SSE event: `kind` is Dify's `event` field; `data` the whole JSON object."""

    kind: str
    data: dict

    @property
    def answer(self) -> str:
        answer = self.data.get("answer")
        return answer if isinstance(answer, str) else ""

    @property
    def body(self) -> dict:
        """The event's `data` object (workflow events), or an empty one."""
        body = self.data.get("data")
        return body if isinstance(body, dict) else {}

    def get(self, name: str, default=None):
        return self.data.get(name, default)


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


class EventReader:
    """Turns the SSE events of each read into a batch of Dify events; stops at the end of the answer or at `error`.

    The end is `message_end` for a chat, agent or completion app, and `workflow_finished` for a chatflow or a
    workflow run (a chatflow's `message_end` comes first, and the rest of a resumed run may only be in the
    outputs: docs/protocol.md); a run's stream also stops at `workflow_paused`, where the run waits for a person
    (a reader with `continue_on_pause` would otherwise never see Dify close it). A chatflow stream that closes
    cleanly after `message_end` is still whole (`answer_ended`). Quiet events are left out, except the first one
    to name the run (`workflow_run_id`, which only workflow events carry). `last_event_at` is when the last event
    that was not a ping came (time.monotonic())."""

    __slots__ = ("ended", "failure", "end_name", "answer_ended", "run_id", "last_event_at")

    def __init__(self, app_type: str = "chat", run_id: str = "") -> None:
        self.ended = False
        self.failure: BackendStreamError | None = None
        self.end_name = WORKFLOW_FINISHED if app_type in RUN_APPS else END_EVENT
        self.answer_ended = False  # message_end came
        self.run_id = run_id
        self.last_event_at = time.monotonic()

    @property
    def follows_a_run(self) -> bool:
        """Whether the stream is a chatflow's or workflow's run (which Dify keeps a record of)."""
        return self.end_name == WORKFLOW_FINISHED

    @property
    def stopped(self) -> bool:
        return self.ended or self.failure is not None

    def read(self, events: list[SSEEvent]) -> list[DifyEvent]:
        """The events of one read worth passing on (pings and quiet events left out)."""
        batch = []
        if self.stopped:
            return batch
        for sse in events:
            event = decode_event(sse.event, sse.data)
            if event is None:
                continue
            self.last_event_at = time.monotonic()
            if event.kind == ERROR_EVENT:
                self.failure = BackendStreamError(
                    str(event.get("message") or "Dify reported an error"),
                    code=str(event.get("code") or "stream_error"),
                    status=event.get("status"),
                )
                break
            names_the_run = self._names_the_run(event)
            if event.kind not in QUIET_EVENTS or names_the_run:
                batch.append(event)
            self.answer_ended = self.answer_ended or event.kind == END_EVENT
            if event.kind in (self.end_name, PAUSED):
                self.ended = True
                break
        return batch

    def _names_the_run(self, event: DifyEvent) -> bool:
        run_id = event.get("workflow_run_id")
        if isinstance(run_id, str) and run_id and run_id != self.run_id:
            self.run_id = run_id
            return True
        return False
