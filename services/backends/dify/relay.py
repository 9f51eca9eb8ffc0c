"""The common case of a Dify read, handled in the read pump's thread without waking the stream's worker."""

from __future__ import annotations

import threading
import time

from services.dify.events import AGENT_MESSAGE_EVENT, MESSAGE_EVENT, WORKFLOW_TEXT, DifyEvent
from services.streams.answer import Answer
from services.streams.store import WRITTEN


class TextRelay:
    """The common case of a read, handled in the read pump's thread without waking the worker: a batch of text
    deltas (or nothing, like a ping) while all is well. Anything else (new ids, the first delta, another event,
    a writer that has news, cancellation, the deadline) returns False, and the recorder's `apply` handles it."""

    __slots__ = ("answer", "cancelled", "deadline")

    def __init__(self, answer: Answer, cancelled: threading.Event, deadline: float):
        self.answer = answer
        self.cancelled = cancelled
        self.deadline = deadline

    def __call__(self, batch: list[DifyEvent]) -> bool:
        answer = self.answer
        writer = answer.writer
        if not answer.answered or answer.thinking or answer.detached or not answer.gate.open:
            return False
        if answer.progress is not None and answer.progress.pending:
            return False
        if writer.state != WRITTEN or writer.error is not None:
            return False
        if self.cancelled.is_set() or time.monotonic() > self.deadline:
            return False
        deltas = []
        for event in batch:
            data = event.data
            if _brings_new_ids(data, answer):
                return False
            if event.kind == AGENT_MESSAGE_EVENT or (event.kind == MESSAGE_EVENT and not answer.agent_messages):
                text = data.get("answer")
            elif event.kind == WORKFLOW_TEXT:
                text = event.body.get("text")
            else:
                return False
            if text and isinstance(text, str):
                deltas.append(text)
        if answer.mask.active:  # content rules: matches masked, a tail that could become one held (or let go)
            released = answer.mask.admit("".join(deltas)) if deltas else answer.mask.due()
            deltas = [released] if released else []
        if deltas:
            answer.text += "".join(deltas)
            writer.add(deltas)
        return True


def _brings_new_ids(data: dict, answer: Answer) -> bool:
    return (
        data.get("task_id", answer.task_id) != answer.task_id
        or data.get("message_id", answer.message_id) != answer.message_id
        or data.get("conversation_id", answer.conversation_id) != answer.conversation_id
        or data.get("workflow_run_id", answer.workflow_run_id) != answer.workflow_run_id
    )
