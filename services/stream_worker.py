"""The background side of one answer: call Dify, write its deltas to Redis, and always leave a final state.

Runs in a thread started by the runner. Every outcome ends in `finish()`: `done` with the answer, or `error` with
the partial text kept and a short note for the user. If another replica took the stream over (lease lost, or
the stream was closed as orphaned), the worker stops writing at once, so there are never two answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from services.auth import AuthError
from services.dify_client import (
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
    DifyStreamCut,
    DifyStreamError,
    DifyTimeout,
)
from services.stream_store import DONE, ERROR, StreamStore
from services.texts import Texts
from utils.logging import bind_log_context, log_context

logger = logging.getLogger(__name__)

_MAX_DELTAS_PER_WRITE = 1000
_FINISH_ATTEMPTS = 4


class StreamAborted(Exception):
    """This replica no longer owns the stream (taken over or closed elsewhere): stop without writing."""


@dataclass(slots=True)
class StreamJob:
    """Everything a worker needs to answer one message (any replica can rebuild it from the stream hash)."""

    stream_id: str
    msgid: str
    userid: str
    aibotid: str = ""
    chatid: str = ""
    query: str = ""
    files: list = field(default_factory=list)

    @property
    def dify_user(self) -> str:
        """The Dify end-user: the WeCom userid namespaced by bot, stable across messages and restarts."""
        return f"wecom:{self.aibotid or 'bot'}:{self.userid}"


@dataclass(slots=True)
class _Progress:
    task_id: str = ""
    message_id: str = ""
    conversation_id: str = ""
    written: int = 0
    ended: bool = False
    last_thought: str = ""
    workflow_error: str = ""
    usage: dict = field(default_factory=dict)
    new_fields: dict = field(default_factory=dict)

    def note_ids(self, event: DifyEvent) -> None:
        for name in ("task_id", "message_id", "conversation_id"):
            value = event.get(name)
            if isinstance(value, str) and value and value != getattr(self, name):
                setattr(self, name, value)
                self.new_fields[name] = value
                if name == "task_id":
                    bind_log_context(task=value)


class StreamWorker:
    """Answers one StreamJob. `prepare(job)` returns the Dify `inputs` or raises AuthError (no Dify call then)."""

    def __init__(
        self,
        store: StreamStore,
        dify: DifyClient,
        texts: Texts,
        owner: str,
        max_seconds: float,
        prepare: Callable[[StreamJob], dict] | None = None,
    ):
        self.store = store
        self.dify = dify
        self.texts = texts
        self.owner = owner
        self.max_seconds = max_seconds
        self.prepare = prepare or (lambda job: {})

    def run(self, job: StreamJob, cancelled: threading.Event) -> None:
        """Thread entry point: never raises, always leaves a final state unless another replica owns the stream."""
        with log_context(stream=job.stream_id, msgid=job.msgid, user=job.userid):
            progress = _Progress()
            try:
                self._answer(job, cancelled, progress)
            except StreamAborted:
                logger.info("stream is owned or closed elsewhere now; worker stops")
            except AuthError as refusal:
                logger.info("not asking Dify: %s", refusal.code)
                self._finish(job, ERROR, note=self.texts.failure_note(refusal), error=refusal.code)
            except DifyError as exc:
                self._fail(job, exc, progress)
            except Exception:
                logger.exception("stream worker failed")
                self._finish(job, ERROR, note=self.texts.say("internal_error"), error="internal_error")

    def _answer(self, job: StreamJob, cancelled: threading.Event, progress: _Progress) -> None:
        inputs = self.prepare(job)
        request = ChatRequest(query=job.query, user=job.dify_user, inputs=inputs, files=job.files)
        deadline = time.monotonic() + self.max_seconds
        logger.info("calling Dify")
        for batch in self.dify.stream_chat(request):
            if cancelled.is_set():
                raise StreamAborted
            self._apply(job, batch, progress)
            if progress.ended:
                break
            if time.monotonic() > deadline:
                raise DifyTimeout(f"answer ran past {self.max_seconds:.0f}s", code="total_timeout")
        self._complete(job, progress)

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
                self._owned(self.store.replace(job.stream_id, self.owner, event.answer))
                progress.written = 1 if event.answer else 0
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
                logger.debug("Dify sent a file (%s); files are not relayed yet", event.get("type"))
            else:
                logger.debug("ignored Dify event %s", kind)
        self._write(job, deltas, progress)

    def _write(self, job: StreamJob, deltas: list[str], progress: _Progress) -> None:
        if not deltas and not progress.new_fields:
            return
        for start in range(0, max(len(deltas), 1), _MAX_DELTAS_PER_WRITE):
            piece = deltas[start : start + _MAX_DELTAS_PER_WRITE]
            self._owned(self.store.append(job.stream_id, self.owner, piece, progress.written, progress.new_fields))
            progress.written += len(piece)
            progress.new_fields = {}

    def _complete(self, job: StreamJob, progress: _Progress) -> None:
        note = ""
        if not progress.written:
            if progress.last_thought:
                # Some agent setups put the whole answer in agent_thought and never stream agent_message.
                self._write(job, [progress.last_thought], progress)
            else:
                note = self.texts.say("empty_answer")
        fields = {
            "note": note,
            "tokens": progress.usage.get("total_tokens", ""),
            "dify_latency": progress.usage.get("latency", ""),
        }
        logger.info("answer complete (%s tokens)", fields["tokens"] or "?")
        self._finish(job, DONE, **{k: v for k, v in fields.items() if v != ""})

    def _fail(self, job: StreamJob, exc: DifyError, progress: _Progress) -> None:
        if isinstance(exc, DifyStreamCut) and progress.workflow_error:
            exc = DifyStreamError(progress.workflow_error, code="workflow_failed")
        logger.warning("Dify failed: %s (%s)", exc.code, exc.message[:200])
        if isinstance(exc, DifyTimeout) and progress.task_id:
            self.dify.stop(progress.task_id, job.dify_user)
        self._finish(job, ERROR, note=self.texts.failure_note(exc), error=f"{exc.code}: {exc.message[:200]}")

    def _finish(self, job: StreamJob, status: str, **fields: str) -> None:
        """Record the final state, retrying through a short Redis outage; if Redis stays away, the lease
        expires once this thread is gone and the next poll closes the bubble instead."""
        for attempt in range(_FINISH_ATTEMPTS):
            try:
                if not self.store.finish(job.stream_id, self.owner, status, fields):
                    logger.info("stream was already closed elsewhere; final state not written")
                return
            except redis.RedisError as exc:
                logger.warning("could not record final state (attempt %d): %s", attempt + 1, exc)
                time.sleep(0.5 * 2**attempt)
        logger.error("gave up recording the final state; the lease will expire and a poll will close the bubble")

    @staticmethod
    def _owned(still_owner: bool) -> None:
        if not still_owner:
            raise StreamAborted
