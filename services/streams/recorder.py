"""The answer as it is being built: Dify's events of one call applied to the in-memory answer and to the stream's
writer (services/streams/writer.py), which sends them to Redis without making the worker wait.

`TextRelay` handles the common read (plain text deltas) in the read pump's thread; everything else goes through
`AnswerRecorder.apply` in the stream's own thread. Either way the answer in memory stays whole, so whatever
happens to Redis or to the bubble, the finisher can still deliver it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from services import metrics
from services.chat.conversations import ConversationStore
from services.chat.media import MediaService
from services.dify.events import (
    END_EVENT,
    FILE_EVENT,
    REPLACE_EVENT,
    TEXT_EVENTS,
    THOUGHT_EVENT,
    WORKFLOW_FINISHED,
    DifyEvent,
)
from services.redis_conn import REDIS_FAILURES
from services.streams.job import StreamJob
from services.streams.outage import RETRY_DELAYS, best_effort
from services.streams.store import CLOSED, CONFLICT, TAKEN, WRITTEN, StreamStore
from services.streams.writer import StreamWriter
from services.wecom.limits import MAX_REPLY_IMAGES
from utils.logging import bind_log_context

logger = logging.getLogger(__name__)

FLUSH_TIMEOUT = 10.0


class StreamAborted(Exception):
    """This replica no longer owns the stream (taken over or closed elsewhere): stop without writing."""


@dataclass(slots=True)
class Answer:
    """Everything known about one answer so far."""

    task_id: str = ""
    message_id: str = ""
    conversation_id: str = ""
    writer: StreamWriter | None = None  # this stream's ordered Redis writes
    text: str = ""  # the whole answer so far
    outage_since: float | None = None
    detached: bool = False  # the stream was closed elsewhere: the answer goes out through response_url
    ended: bool = False
    last_thought: str = ""
    workflow_error: str = ""
    images: list[dict] = field(default_factory=list)  # msg_item payloads, written with the final state
    usage: dict = field(default_factory=dict)
    new_fields: dict = field(default_factory=dict)
    conversation_saved: str = ""

    def note_ids(self, event: DifyEvent) -> None:
        """Take the task, message and conversation ids an event names (new ones go to the hash too)."""
        for name in ("task_id", "message_id", "conversation_id"):
            value = event.get(name)
            if isinstance(value, str) and value and value != getattr(self, name):
                setattr(self, name, value)
                self.new_fields[name] = value
                if name == "task_id":
                    bind_log_context(task=value)

    def check_writer(self) -> None:
        """Act on what the writer has learnt: stop at once (taken over), go on without Redis (closed elsewhere),
        or note a Redis outage (the writer keeps the deltas and sends them when Redis is back).

        Raises:
            StreamAborted: another replica owns the stream now.
        """
        writer = self.writer
        if writer.state == TAKEN:
            raise StreamAborted
        if writer.state == CLOSED and not self.detached:
            logger.warning("the stream was closed elsewhere; the answer will be sent through response_url")
            self.detached = True
        if writer.error is not None and self.outage_since is None:
            self.outage_since = time.monotonic()
            logger.warning("Redis unavailable; keeping the answer in memory until it returns: %s", writer.error)
        elif writer.error is None and self.outage_since is not None:
            logger.info("Redis is back after %.1fs; answer written", time.monotonic() - self.outage_since)
            self.outage_since = None


def keep_in_step(answer: Answer, store: StreamStore, owner: str, stream_id: str) -> None:
    """Act on what the stream's writer has learnt (Answer.check_writer); and when its list lost deltas (a Redis
    failover: replication is asynchronous, so the new master may lack the last appends), write the answer whole
    again from memory, so the bubble shows it all, once.

    Raises:
        StreamAborted: another replica owns the stream now.
    """
    answer.check_writer()
    if answer.writer.state == CONFLICT and not answer.detached:
        logger.warning("the stream's list lost deltas it had taken (a Redis failover?); writing the answer whole")
        write_whole(answer, store, owner, stream_id)


def write_whole(answer: Answer, store: StreamStore, owner: str, stream_id: str) -> None:
    """Replace the stream's list with the whole answer (`answer.text`), after what is queued. If Redis will not
    take it, or the stream was closed elsewhere, the answer goes through response_url at the end instead.

    Raises:
        StreamAborted: another replica owns the stream now.
    """
    if answer.detached:
        return
    try:
        answer.writer.flush(FLUSH_TIMEOUT)
        result = store.replace(stream_id, owner, answer.text)
    except REDIS_FAILURES as exc:
        logger.warning("could not write the answer whole (%s); it will be sent through response_url", exc)
        answer.detached = True
        return
    if result == TAKEN:
        raise StreamAborted
    if result == CLOSED:
        answer.detached = True
        return
    answer.writer.reset(1 if answer.text else 0)


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
        if not answer.text or answer.detached or writer.state != WRITTEN or writer.error is not None:
            return False
        if self.cancelled.is_set() or time.monotonic() > self.deadline:
            return False
        deltas = []
        for event in batch:
            data = event.data
            if event.kind not in TEXT_EVENTS or _brings_new_ids(data, answer):
                return False
            if text := data.get("answer"):
                deltas.append(text)
        if deltas:
            answer.text += "".join(deltas)
            writer.add(deltas)
        return True


def _brings_new_ids(data: dict, answer: Answer) -> bool:
    return (
        data.get("task_id", answer.task_id) != answer.task_id
        or data.get("message_id", answer.message_id) != answer.message_id
        or data.get("conversation_id", answer.conversation_id) != answer.conversation_id
    )


class AnswerRecorder:
    """Applies one stream's Dify events: deltas to its writer, a replace, ids, the agent's thoughts, a failed
    workflow, usage, reply images, and the conversation to continue next time."""

    def __init__(
        self,
        job: StreamJob,
        answer: Answer,
        store: StreamStore,
        owner: str,
        conversations: ConversationStore,
        media: MediaService,
    ):
        self.job = job
        self.answer = answer
        self.store = store
        self.owner = owner
        self.conversations = conversations
        self.media = media

    def apply(self, batch: list[DifyEvent]) -> None:
        """Record one network read's worth of events: deltas in one append, a replace in its own call."""
        answer = self.answer
        deltas: list[str] = []
        for event in batch:
            answer.note_ids(event)
            kind = event.kind
            if kind in TEXT_EVENTS:
                if event.answer:
                    deltas.append(event.answer)
            elif kind == REPLACE_EVENT:
                self.write(deltas)
                deltas = []
                self._replace(event.answer)
            elif kind == END_EVENT:
                answer.ended = True
                metadata = event.get("metadata")
                if isinstance(metadata, dict) and isinstance(metadata.get("usage"), dict):
                    answer.usage = metadata["usage"]
            elif kind == THOUGHT_EVENT:
                thought = event.get("thought")
                if isinstance(thought, str) and thought.strip():
                    answer.last_thought = thought
            elif kind == WORKFLOW_FINISHED:
                data = event.get("data") if isinstance(event.get("data"), dict) else {}
                if data.get("status") == "failed":
                    answer.workflow_error = str(data.get("error") or "workflow failed")[:300]
            elif kind == FILE_EVENT:
                self._keep_image(event)
            else:
                logger.debug("ignored Dify event %s", kind)
        self.write(deltas)
        self.save_conversation(retry=False)

    def write(self, deltas: list[str]) -> None:
        """Hand deltas (and new fields) to the stream's writer, which sends them without making us wait."""
        answer = self.answer
        if deltas and not answer.text:
            metrics.FIRST_TOKEN_SECONDS.observe(max(0.0, time.time() - self.job.created_at))
        answer.text += "".join(deltas)
        if answer.detached or not (deltas or answer.new_fields):
            return
        answer.writer.add(deltas, answer.new_fields)
        answer.new_fields = {}
        keep_in_step(answer, self.store, self.owner, self.job.stream_id)

    def _replace(self, text: str) -> None:
        """Dify's message_replace: everything before it is written first, then the whole answer is replaced."""
        self.answer.text = text
        write_whole(self.answer, self.store, self.owner, self.job.stream_id)

    def save_conversation(self, retry: bool = True) -> None:
        """Remember the conversation Dify named, so the user's next message continues it. Mid-stream one try is
        enough (the next read tries again); at the end a short outage is waited out."""
        answer = self.answer
        conversation_id = answer.conversation_id
        if not conversation_id or conversation_id == answer.conversation_saved:
            return
        job = self.job
        saved = best_effort(
            lambda: self.conversations.remember(job.aibotid, job.chatid, job.userid, conversation_id),
            "remembering the conversation",
            delays=RETRY_DELAYS if retry else (),
        )
        if saved:
            answer.conversation_saved = conversation_id

    def _keep_image(self, event: DifyEvent) -> None:
        """An image Dify made for the answer: fetched now, attached to the final reply as msg_item."""
        answer = self.answer
        url = event.get("url")
        if event.get("type") != "image" or event.get("belongs_to", "assistant") != "assistant":
            return
        if not isinstance(url, str) or len(answer.images) >= MAX_REPLY_IMAGES:
            return
        image = self.media.fetch_reply_image(url)
        if image is not None:
            answer.images.append(image)
