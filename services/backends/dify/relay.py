"""The common case of a Dify read (plain text deltas), handled in the read pump's thread without waking the stream's
worker (services/streams/relay.py)."""

from __future__ import annotations

import threading

from services.backends.dify.run import DifyRun
from services.dify.events import AGENT_MESSAGE_EVENT, MESSAGE_EVENT, WORKFLOW_TEXT, DifyEvent
from services.streams.answer import Answer
from services.streams.relay import PlainTextRelay


class TextRelay(PlainTextRelay):
    """A read of Dify's plain text deltas (or nothing, like a ping) while all is well. Anything else (new ids, the
    first delta, another event, a writer that has news, text the run's gate holds back, cancellation, the
    deadline) returns False, and the recorder's `apply` handles it."""

    __slots__ = ("run",)

    def __init__(self, answer: Answer, run: DifyRun, cancelled: threading.Event, deadline: float):
        super().__init__(answer, cancelled, deadline)
        self.run = run

    def __call__(self, batch: list[DifyEvent]) -> bool:
        if not self.run.gate.open or not self.ready():
            return False
        answer = self.answer
        texts = []
        for event in batch:
            data = event.data
            if _brings_new_ids(data, answer):
                return False
            if event.kind == AGENT_MESSAGE_EVENT or (event.kind == MESSAGE_EVENT and not self.run.agent_messages):
                text = data.get("answer")
            elif event.kind == WORKFLOW_TEXT:
                text = event.body.get("text")
            else:
                return False
            if text and isinstance(text, str):
                texts.append(text)
        self.take(texts)
        return True


def _brings_new_ids(data: dict, answer: Answer) -> bool:
    return (
        data.get("task_id", answer.task_id) != answer.task_id
        or data.get("message_id", answer.message_id) != answer.message_id
        or data.get("conversation_id", answer.conversation_id) != answer.conversation_id
        or data.get("workflow_run_id", answer.workflow_run_id) != answer.workflow_run_id
    )
