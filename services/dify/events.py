"""Dify's SSE events as typed values: the event names the gateway acts on, and a reader that turns the events of
one network read into a batch, stopping at the end of the answer (`message_end`; `workflow_finished` for a
workflow app; `workflow_paused` for any app that waits for a person) or at an `error` event."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson

from services.dify.errors import DifyStreamError
from services.dify.transport import SSEEvent

logger = logging.getLogger(__name__)

MESSAGE_EVENT = "message"
AGENT_MESSAGE_EVENT = "agent_message"
TEXT_EVENTS = frozenset({MESSAGE_EVENT, AGENT_MESSAGE_EVENT})
END_EVENT = "message_end"
ERROR_EVENT = "error"
REPLACE_EVENT = "message_replace"
FILE_EVENT = "message_file"
THOUGHT_EVENT = "agent_thought"
WORKFLOW_STARTED = "workflow_started"
WORKFLOW_FINISHED = "workflow_finished"
WORKFLOW_TEXT = "text_chunk"  # a workflow app's answer delta, in data.text
WORKFLOW_REPLACE = "text_replace"
REASONING_EVENT = "reasoning_chunk"
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
        FORM_FILLED,
    }
)


@dataclass(slots=True)
class FormsSeen:
    """What a reader of a re-attached run knows of its forms: the tokens of those answered already (their
    `human_input_required` and the pause after it are history, passed over), and `after`, the form just answered:
    everything up to its `human_input_form_filled` (or `_timeout`) is left out, as Dify may send the run from its
    start."""

    answered: frozenset[str] = frozenset()
    after: str = ""


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
    """Turns the SSE events of each read into a batch of Dify events; stops at the end of the answer (for an app
    of type `app_type`) or at `error`."""

    __slots__ = ("ended", "failure", "end_name", "_ends", "_forms", "_waiting_for", "_past_pause")

    def __init__(self, app_type: str = "chat", forms: FormsSeen | None = None) -> None:
        self.ended = False
        self.failure: DifyStreamError | None = None
        self.end_name = WORKFLOW_FINISHED if app_type == "workflow" else END_EVENT
        self._ends = frozenset({self.end_name, PAUSED})
        self._forms = forms or FormsSeen()
        self._waiting_for = self._forms.after  # leave everything out until this form's answer
        self._past_pause = False  # an answered form's pause is coming: not an end

    def _history(self, event: DifyEvent) -> bool:
        """Whether a re-attached run's event is one already seen (before the form just answered, or an answered
        form's request and pause)."""
        token = event.body.get("form_token") or event.get("form_token")
        if self._waiting_for:
            if event.kind in (FORM_FILLED, FORM_TIMEOUT) and token in (self._waiting_for, None):
                self._waiting_for = ""
                return event.kind == FORM_FILLED  # a timeout is news for the user; a filled form is not
            if event.kind == self.end_name or event.kind == WORKFLOW_FINISHED:  # it ended before we re-attached
                self._waiting_for = ""
                return False
            return event.kind != ERROR_EVENT
        if event.kind == INPUT_REQUIRED and token in self._forms.answered:
            self._past_pause = True
            return True
        if event.kind == PAUSED and self._past_pause:
            self._past_pause = False
            return True
        return False

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
            if event is None or self._history(event):
                continue
            if event.kind == ERROR_EVENT:
                self.failure = DifyStreamError(
                    str(event.get("message") or "Dify reported an error"),
                    code=str(event.get("code") or "stream_error"),
                    status=event.get("status"),
                )
                break
            if event.kind not in QUIET_EVENTS:
                batch.append(event)
            if event.kind in self._ends:
                self.ended = True
                break
        return batch
