"""The background side of one answer: call Dify, write its deltas to Redis, and always leave a final state.

Runs in a thread started by the runner. Every outcome ends in `finish()`: `done` with the answer, or `error` with
the partial text kept and a short note for the user. If another replica took the stream over (lease lost, or
the stream was closed as orphaned), the worker stops writing at once, so there are never two answers. When the
bubble had to close early (WeCom's window or size limit), the worker sends the rest once through response_url.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import redis

from services import metrics
from services.auth.authorizer import AuthError
from services.chat.conversations import ConversationStore
from services.chat.media import IMAGE, MediaService
from services.chat.texts import Texts
from services.dify.client import (
    END_EVENT,
    FILE_EVENT,
    REPLACE_EVENT,
    TEXT_EVENTS,
    THOUGHT_EVENT,
    WORKFLOW_FINISHED,
    ChatRequest,
    DifyClient,
    DifyError,
    DifyEvent,
    DifyHTTPError,
    DifyStreamCut,
    DifyStreamError,
    DifyTimeout,
)
from services.dify.feedback import FeedbackService
from services.streams.bubble import BubbleRenderer, remainder_message, text_at_close
from services.streams.store import CLOSED, DONE, ERROR, TAKEN, WRITTEN, Finished, StreamConflict, StreamStore
from services.streams.writer import AppendBatcher, StreamWriter
from services.wecom.limits import MAX_REPLY_IMAGES
from services.wecom.response_url import ResponseUrlClient
from utils.logging import bind_log_context, log_context

logger = logging.getLogger(__name__)

_FLUSH_TIMEOUT = 10.0
_FINISH_ATTEMPTS = 4


class StreamAborted(Exception):
    """This replica no longer owns the stream (taken over or closed elsewhere): stop without writing."""


class Declined(Exception):
    """The message cannot be answered as sent (e.g. a file the app does not take): finish with a note, no Dify."""

    def __init__(self, note_key: str, status: str = DONE):
        super().__init__(note_key)
        self.note_key = note_key
        self.status = status


@dataclass(slots=True)
class StreamJob:
    """Everything a worker needs to answer one message."""

    stream_id: str
    msgid: str
    userid: str
    aibotid: str = ""
    chatid: str = ""
    query: str = ""
    typed_query: bool = True
    response_url: str = ""
    attachments: list[tuple[str, str]] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)  # when the user's message arrived

    @property
    def dify_user(self) -> str:
        """The Dify end-user: the WeCom userid namespaced by bot, stable across messages and restarts."""
        return f"wecom:{self.aibotid or 'bot'}:{self.userid}"

    def request_fields(self) -> dict[str, str]:
        """What the stream hash keeps so that another replica can restart this job (see `from_meta`)."""
        return {
            "query": self.query,
            "typed_query": "1" if self.typed_query else "",
            "attachments": orjson.dumps(self.attachments).decode() if self.attachments else "",
        }

    @classmethod
    def from_meta(cls, stream_id: str, meta: dict[str, str]) -> StreamJob:
        """Rebuild the job of a stream from its hash (a takeover on another replica)."""
        return cls(
            stream_id=stream_id,
            msgid=meta.get("msgid", ""),
            userid=meta.get("userid", ""),
            aibotid=meta.get("aibotid", ""),
            chatid=meta.get("chatid", ""),
            query=meta.get("query", ""),
            typed_query=bool(meta.get("typed_query")),
            response_url=meta.get("response_url", ""),
            attachments=[tuple(a) for a in orjson.loads(meta["attachments"])] if meta.get("attachments") else [],
            created_at=float(meta.get("created_at") or time.time()),
        )


@dataclass(slots=True)
class _Progress:
    task_id: str = ""
    message_id: str = ""
    conversation_id: str = ""
    writer: StreamWriter | None = None  # this stream's ordered Redis writes (see services/streams/writer.py)
    text: str = ""  # the whole answer so far
    outage_since: float | None = None
    detached: bool = False  # the stream was closed elsewhere: the answer goes out through response_url
    ended: bool = False
    last_thought: str = ""
    workflow_error: str = ""
    images: int = 0
    usage: dict = field(default_factory=dict)
    new_fields: dict = field(default_factory=dict)
    conversation_saved: str = ""

    def note_ids(self, event: DifyEvent) -> None:
        for name in ("task_id", "message_id", "conversation_id"):
            value = event.get(name)
            if isinstance(value, str) and value and value != getattr(self, name):
                setattr(self, name, value)
                self.new_fields[name] = value
                if name == "task_id":
                    bind_log_context(task=value)


class _TextRelay:
    """The common case of a read, handled in the read pump's thread without waking the worker: a batch of text
    deltas (or nothing, like a ping) while all is well. Anything else (new ids, the first delta, another event,
    a writer that has news, cancellation, the deadline) returns False, and the worker's `_apply` handles it."""

    __slots__ = ("progress", "cancelled", "deadline")

    def __init__(self, progress: _Progress, cancelled: threading.Event, deadline: float):
        self.progress = progress
        self.cancelled = cancelled
        self.deadline = deadline

    def __call__(self, batch: list[DifyEvent]) -> bool:
        progress = self.progress
        writer = progress.writer
        if not progress.text or progress.detached or writer.state != WRITTEN or writer.error is not None:
            return False
        if self.cancelled.is_set() or time.monotonic() > self.deadline:
            return False
        deltas = []
        for event in batch:
            data = event.data
            if event.kind not in TEXT_EVENTS or _brings_new_ids(data, progress):
                return False
            if answer := data.get("answer"):
                deltas.append(answer)
        if deltas:
            progress.text += "".join(deltas)
            writer.add(deltas)
        return True


def _brings_new_ids(data: dict, progress: _Progress) -> bool:
    return (
        data.get("task_id", progress.task_id) != progress.task_id
        or data.get("message_id", progress.message_id) != progress.message_id
        or data.get("conversation_id", progress.conversation_id) != progress.conversation_id
    )


@dataclass
class WorkerDeps:
    """The services a worker uses besides the store and Dify."""

    conversations: ConversationStore
    media: MediaService
    feedback: FeedbackService
    responder: ResponseUrlClient
    bubble: BubbleRenderer
    appender: AppendBatcher


class StreamWorker:
    """Answers one StreamJob. `prepare(job)` returns the Dify `inputs` or raises AuthError (no Dify call then)."""

    def __init__(
        self,
        store: StreamStore,
        dify: DifyClient,
        texts: Texts,
        owner: str,
        max_seconds: float,
        deps: WorkerDeps,
        prepare: Callable[[StreamJob], dict] | None = None,
    ):
        self.store = store
        self.dify = dify
        self.texts = texts
        self.owner = owner
        self.max_seconds = max_seconds
        self.deps = deps
        self.prepare = prepare or (lambda job: {})

    def run(self, job: StreamJob, cancelled: threading.Event) -> None:
        """Thread entry point: never raises, always leaves a final state unless another replica owns the stream."""
        with log_context(
            replica=self.owner, stream=job.stream_id, msgid=job.msgid, user=job.userid, chat=job.chatid or None
        ):
            progress = _Progress()
            try:
                self._answer(job, cancelled, progress)
            except StreamAborted:
                metrics.STREAM_OUTCOMES.labels("taken_over_elsewhere").inc()
                logger.info("stream is owned or closed elsewhere now; worker stops")
            except AuthError as refusal:
                logger.info("not asking Dify: %s", refusal.code)
                self._finish(job, progress, ERROR, note=self.texts.failure_note(refusal), error=refusal.code)
            except Declined as declined:
                logger.info("declined: %s", declined.note_key)
                self._finish(
                    job,
                    progress,
                    declined.status,
                    note=self.texts.say(declined.note_key),
                    error="" if declined.status == DONE else declined.note_key,
                )
            except DifyError as exc:
                self._fail(job, exc, progress)
            except Exception:
                logger.exception("stream worker failed")
                self._finish(job, progress, ERROR, note=self.texts.say("internal_error"), error="internal_error")

    # --- the Dify call ----------------------------------------------------------------------------------------

    def _answer(self, job: StreamJob, cancelled: threading.Event, progress: _Progress) -> None:
        inputs = self.prepare(job)
        files, attachment_note = self._attachments(job)
        conversations = self.deps.conversations
        conversation_id = conversations.current(job.aibotid, job.chatid, job.userid)
        deadline = time.monotonic() + self.max_seconds
        progress.writer = self.deps.appender.writer(job.stream_id)
        while True:
            request = ChatRequest(
                query=job.query, user=job.dify_user, inputs=inputs, conversation_id=conversation_id, files=files
            )
            logger.info("calling Dify%s", " (continuing the conversation)" if conversation_id else "")
            try:
                self._consume(job, request, cancelled, progress, deadline)
                break
            except DifyHTTPError as exc:
                if not conversation_id or not (exc.status == 404 or exc.code == "conversation_completed"):
                    raise
                logger.info("Dify no longer has the conversation (%s); starting a new one", exc.code)
                conversations.forget(job.aibotid, job.chatid, job.userid)
                conversation_id = ""
        self._complete(job, progress, attachment_note)

    def _consume(
        self, job: StreamJob, request: ChatRequest, cancelled: threading.Event, progress: _Progress, deadline: float
    ) -> None:
        relay = _TextRelay(progress, cancelled, deadline)
        for batch in self.dify.stream_chat(request, relay):
            if cancelled.is_set():
                raise StreamAborted
            self._apply(job, batch, progress)
            if progress.ended:
                return
            if time.monotonic() > deadline:
                raise DifyTimeout(f"answer ran past {self.max_seconds:.0f}s", code="total_timeout")

    def _attachments(self, job: StreamJob) -> tuple[list[dict], str]:
        """The Dify files for the job's images/file, and a note for what had to be left out."""
        if not job.attachments:
            return [], ""
        prepared = self.deps.media.prepare(job.attachments, job.dify_user)
        if not prepared.files and not job.typed_query:
            if prepared.failed:
                raise Declined("media_failed", ERROR)
            raise Declined("images_unsupported" if IMAGE in prepared.refused else "files_unsupported")
        if prepared.refused:
            return prepared.files, self.texts.say("images_ignored" if IMAGE in prepared.refused else "media_partial")
        return prepared.files, self.texts.say("media_partial") if prepared.failed else ""

    def _apply(self, job: StreamJob, batch: list[DifyEvent], progress: _Progress) -> None:
        """Write one network read's worth of events: deltas in one append, a replace in its own call."""
        deltas: list[str] = []
        for event in batch:
            progress.note_ids(event)
            kind = event.kind
            if kind in TEXT_EVENTS:
                if event.answer:
                    deltas.append(event.answer)
            elif kind == REPLACE_EVENT:
                self._write(job, deltas, progress)
                deltas = []
                self._replace(job, event.answer, progress)
            elif kind == END_EVENT:
                progress.ended = True
                metadata = event.get("metadata")
                if isinstance(metadata, dict) and isinstance(metadata.get("usage"), dict):
                    progress.usage = metadata["usage"]
            elif kind == THOUGHT_EVENT:
                thought = event.get("thought")
                if isinstance(thought, str) and thought.strip():
                    progress.last_thought = thought
            elif kind == WORKFLOW_FINISHED:
                data = event.get("data") if isinstance(event.get("data"), dict) else {}
                if data.get("status") == "failed":
                    progress.workflow_error = str(data.get("error") or "workflow failed")[:300]
            elif kind == FILE_EVENT:
                self._keep_reply_image(job, event, progress)
            else:
                logger.debug("ignored Dify event %s", kind)
        self._write(job, deltas, progress)
        self._remember_conversation(job, progress)

    def _write(self, job: StreamJob, deltas: list[str], progress: _Progress) -> None:
        """Hand deltas (and new fields) to the stream's writer, which sends them without making us wait."""
        if deltas and not progress.text:
            metrics.FIRST_TOKEN_SECONDS.observe(max(0.0, time.time() - job.created_at))
        progress.text += "".join(deltas)
        if progress.detached or not (deltas or progress.new_fields):
            return
        progress.writer.add(deltas, progress.new_fields)
        progress.new_fields = {}
        self._check_writer(progress)

    def _check_writer(self, progress: _Progress) -> None:
        """Act on what the writer has learnt: stop at once (taken over), go on without Redis (closed elsewhere),
        or note a Redis outage (the writer keeps the deltas and sends them when Redis is back)."""
        writer = progress.writer
        if writer.state == TAKEN:
            raise StreamAborted
        if writer.state == CLOSED and not progress.detached:
            logger.warning("the stream was closed elsewhere; the answer will be sent through response_url")
            progress.detached = True
        if isinstance(writer.error, StreamConflict):
            raise writer.error
        if writer.error is not None and progress.outage_since is None:
            progress.outage_since = time.monotonic()
            logger.warning("Redis unavailable; keeping the answer in memory until it returns: %s", writer.error)
        elif writer.error is None and progress.outage_since is not None:
            logger.info("Redis is back after %.1fs; answer written", time.monotonic() - progress.outage_since)
            progress.outage_since = None

    def _replace(self, job: StreamJob, answer: str, progress: _Progress) -> None:
        """Dify's message_replace: everything before it is written first, then the whole answer is replaced."""
        progress.text = answer
        if progress.detached:
            return
        try:
            progress.writer.flush(_FLUSH_TIMEOUT)
            result = self.store.replace(job.stream_id, self.owner, answer)
        except redis.RedisError as exc:
            logger.warning("could not replace the answer in Redis (%s); it will be sent through response_url", exc)
            progress.detached = True
            return
        if result == TAKEN:
            raise StreamAborted
        if result == CLOSED:
            progress.detached = True
            return
        progress.writer.reset(1 if answer else 0)

    def _remember_conversation(self, job: StreamJob, progress: _Progress) -> None:
        if progress.conversation_id and progress.conversation_id != progress.conversation_saved:
            self.deps.conversations.remember(job.aibotid, job.chatid, job.userid, progress.conversation_id)
            progress.conversation_saved = progress.conversation_id

    def _keep_reply_image(self, job: StreamJob, event: DifyEvent, progress: _Progress) -> None:
        url = event.get("url")
        if event.get("type") != "image" or event.get("belongs_to", "assistant") != "assistant":
            return
        if not isinstance(url, str) or progress.images >= MAX_REPLY_IMAGES:
            return
        image = self.deps.media.fetch_reply_image(url)
        if image is not None:
            self.store.add_image(job.stream_id, image)
            progress.images += 1

    # --- endings ----------------------------------------------------------------------------------------------

    def _complete(self, job: StreamJob, progress: _Progress, note: str) -> None:
        if not progress.text:
            if progress.last_thought:
                # Some agent setups put the whole answer in agent_thought and never stream agent_message.
                self._write(job, [progress.last_thought], progress)
            elif not progress.images:
                note = self.texts.say("empty_answer")
        fields = {
            "note": note,
            "tokens": progress.usage.get("total_tokens", ""),
            "dify_latency": progress.usage.get("latency", ""),
        }
        logger.info("answer complete (%s tokens)", fields["tokens"] or "?")
        finished = self._finish(job, progress, DONE, **{k: v for k, v in fields.items() if v != ""})
        if finished is not None and progress.message_id:
            self.deps.feedback.remember(job.stream_id, progress.message_id, job.dify_user)

    def _fail(self, job: StreamJob, exc: DifyError, progress: _Progress) -> None:
        if isinstance(exc, DifyStreamCut) and progress.workflow_error:
            exc = DifyStreamError(progress.workflow_error, code="workflow_failed")
        metrics.DIFY_ERRORS.labels(exc.code).inc()
        logger.warning("Dify failed: %s (%s)", exc.code, exc.message[:200])
        if isinstance(exc, DifyTimeout) and progress.task_id:
            self.dify.stop(progress.task_id, job.dify_user)
        self._finish(job, progress, ERROR, note=self.texts.failure_note(exc), error=f"{exc.code}: {exc.message[:200]}")

    def _finish(self, job: StreamJob, progress: _Progress, status: str, **fields: str) -> Finished | None:
        """Write what is queued and record the final state, retrying through a short Redis outage. If the stream
        was closed elsewhere, or Redis stays away, the whole answer goes out through response_url instead."""
        note = fields.get("note", "")
        for attempt in range(_FINISH_ATTEMPTS):
            try:
                if progress.writer is not None and not progress.detached:
                    progress.writer.flush(_FLUSH_TIMEOUT)
                    if progress.writer.state == TAKEN:
                        logger.info("stream was taken over by another replica; final state not written")
                        return None
                    self._check_writer(progress)
                finished = None if progress.detached else self.store.finish(job.stream_id, self.owner, status, fields)
            except redis.RedisError as exc:
                logger.warning("could not record the final state (attempt %d): %s", attempt + 1, exc)
                time.sleep(0.5 * 2**attempt)
                continue
            if finished is not None:
                metrics.STREAM_OUTCOMES.labels(status).inc()
                metrics.STREAM_SECONDS.observe(max(0.0, time.time() - job.created_at))
                self._send_rest(job, progress, finished, note)
            elif progress.detached:
                metrics.STREAM_OUTCOMES.labels("closed_elsewhere").inc()
                self._send_whole(job, progress, note)
            else:
                logger.info("stream was already closed elsewhere; final state not written")
            return finished
        logger.error("Redis stayed unavailable; sending the answer through response_url instead")
        self._send_whole(job, progress, note)
        return None

    def _send_whole(self, job: StreamJob, progress: _Progress, note: str) -> None:
        """The bubble was finished by someone else (or cannot be updated): send the whole answer once."""
        if not job.response_url:
            logger.warning("the answer could not be delivered: no response_url")
            return
        message = remainder_message(self.texts, progress.text, note, header_key="full_answer")
        delivered = self.deps.responder.send_markdown(job.response_url, message)
        metrics.RESPONSE_URL.labels("whole_answer", "sent" if delivered else "failed").inc()
        logger.info("whole answer %s through response_url", "sent" if delivered else "NOT sent")

    def _send_rest(self, job: StreamJob, progress: _Progress, finished: Finished, note: str) -> None:
        """Send through response_url, once, what the bubble could not show (it closed early or overflowed)."""
        if not job.response_url:
            return
        bubble = self.deps.bubble
        if finished.close_reason:
            shown_text = text_at_close(progress.text, finished.closed_bytes)
            shown = bubble.closed(shown_text, finished.close_reason, True)[1]
            message = remainder_message(self.texts, progress.text[shown:], note)
        else:
            shown = bubble.final(progress.text, note, True)[1]
            if shown >= len(progress.text):
                return
            message = remainder_message(self.texts, progress.text[shown:])
        delivered = self.deps.responder.send_markdown(job.response_url, message)
        metrics.RESPONSE_URL.labels("rest", "sent" if delivered else "failed").inc()
        logger.info("rest of the answer %s through response_url", "sent" if delivered else "NOT sent")
        self.store.record(job.stream_id, {"rest_sent": "yes" if delivered else "failed"})
