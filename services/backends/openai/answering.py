"""An OpenAI-compatible server as a bot's backend (docs/configuration.md, "Backends"; CONTRACT §19).

The request: the system prompt, the conversation's last turns (history.py), then the question (with the user's
images as `image_url` parts when OPENAI_VISION is on), `user` the id a Dify call would carry, `stream_options.
include_usage`, and OPENAI_EXTRA merged in. The stream's text is the answer, its reasoning shown as Dify's is
(SHOW_REASONING); a finish at the model's length limit, or its content filter, ends the answer with a note saying
so. A call the server never took (429, a 5xx status, a connection refused) is asked again while the bubble can wait
(DIFY_RETRY_SECONDS); one that may have reached it is never asked again; 400, 401, 403 and 404 say the bot is
misconfigured, once. Such a server keeps no run another replica could follow: an answer whose replica died ends
with what it showed and the interrupted note (the core's takeover), and nothing pauses for a form.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import orjson

from services.backends.openai.client import SERVER, Chunk, OpenAIClient
from services.backends.openai.history import ConversationTurns, new_conversation_id
from services.media.service import IMAGE, MediaError, sniff
from services.outage import best_effort
from services.streams.answer import StreamAborted
from services.streams.backend import Capabilities
from services.streams.job import StreamJob
from services.streams.record import DONE
from services.streams.relay import PlainTextRelay
from services.streams.sink import AnswerSink
from services.streams.turn import Turn
from services.transport.errors import BackendHTTPError, BackendTimeout, Declined, never_taken
from services.transport.trace import trace_headers

if TYPE_CHECKING:
    from services.backends.parts import BackendParts

logger = logging.getLogger(__name__)

# Statuses that say the bot is set up wrong (its address, key or model): the user is told so, once.
MISCONFIGURED = frozenset({400, 401, 403, 404})
MAX_IMAGE_BYTES = 10 * 1024 * 1024  # a user's image sent inline (WeCom's own cap on images)
# What a finish reason says at the answer's end (the texts' keys).
FINISH_NOTES = {"length": "answer_cut_at_limit", "content_filter": "answer_filtered"}


class ChunkRelay(PlainTextRelay):
    """A read of plain answer text, taken to the writer from the read pump's thread (services/streams/relay.py)."""

    __slots__ = ()

    def __call__(self, batch: list[Chunk]) -> bool:
        if not self.ready():
            return False
        self.take([chunk.content for chunk in batch])
        return True


class OpenAIBackend:
    """One bot's OpenAI-compatible server."""

    name = "openai"
    capabilities = Capabilities()

    def __init__(self, client: OpenAIClient, turns: ConversationTurns, parts: BackendParts):
        self.client = client
        self.turns = turns
        self.settings = parts.settings.openai
        self.extra = orjson.loads(self.settings.extra or "{}")
        self.show_reasoning = parts.settings.dify.show_reasoning  # SHOW_REASONING: the reasoning before the answer
        self.conversations = parts.conversations
        self.media = parts.media
        self.finisher = parts.finisher
        self.texts = parts.texts
        self.health = parts.health

    def answer(self, turn: Turn) -> None:
        """A new question: who may ask it, the conversation it continues, the call (asked again while the server
        never took it), then the final state, and the turn kept for the conversation."""
        job, answer = turn.job, turn.answer
        turn.authorize()
        images, note_key = self._images(job)
        member = (job.aibotid, job.chatid, job.conversation_member)
        known = turn.before_start(lambda: self.conversations.current(*member), "looking up the conversation")
        conversation_id = known or new_conversation_id()
        history = turn.before_start(lambda: self.turns.recent(conversation_id), "reading the conversation")
        turn.take_slot()
        turn.count_call(self.name)
        body = self._request(job, history, images)
        sink = AnswerSink(job, answer, turn.store, turn.bot, self.name, self.show_reasoning)
        logger.info("asking %s (%d earlier turns)", SERVER, len(history))
        finish = turn.tried_again(
            lambda: self._consume(turn, sink, body),
            lambda exc: not answer.text and _not_taken(exc),
            turn.patience_ends(turn.deadline),
            f"{SERVER} did not take the call",
            lambda: turn.count_follow_up(self.name, "asked_again"),
        )
        answer.message_ended()  # the answer is whole: what the content rules held goes on
        sink.close_reasoning()
        sink.write([])
        notes = [self.texts.say(key) for key in (note_key, FINISH_NOTES.get(finish, "")) if key]
        if not answer.answered:
            notes.append(self.texts.say("empty_answer"))
        self._remember(job, conversation_id, sink.answer_so_far())
        self.health.answered()
        usage = answer.usage
        fields = {
            "note": "\n".join(notes),
            "tokens": str(usage.get("total_tokens") or ""),
            "prompt_tokens": str(usage.get("prompt_tokens") or ""),
            "completion_tokens": str(usage.get("completion_tokens") or ""),
            "model": self.settings.model,
        }
        logger.info("answer complete (%s tokens, finish %s)", fields["tokens"] or "?", finish or "?")
        self.finisher.finish(job, answer, DONE, **{k: v for k, v in fields.items() if v})

    def resume(self, turn: Turn) -> None:
        raise NotImplementedError("an OpenAI-compatible server keeps no run to follow again")

    def continue_form(self, turn: Turn) -> None:
        raise NotImplementedError("an OpenAI-compatible server's answers never pause for a form")

    def stop(self, task_id: str, user: str) -> None:
        return None  # its worker closes the stream: the server has nothing more to stop

    def check(self, timeout: float = 5.0) -> str:
        return self.client.access_problem(self.settings.model, timeout)

    def where(self) -> str:
        return f"{urlsplit(self.settings.base_url).netloc} ({self.settings.model})"

    # --- the call --------------------------------------------------------------------------------------------

    def _consume(self, turn: Turn, sink: AnswerSink, body: dict) -> str:
        """One call, its chunks written as they come; returns its finish reason ("" when the server gave none).

        Raises:
            BackendHTTPError (code `misconfigured` for MISCONFIGURED), BackendConnectionError, BackendTimeout,
            BackendStreamError, BackendStreamCut; StreamAborted (the answer was stopped, or taken elsewhere).
        """
        answer, cancelled = turn.answer, turn.cancelled
        relay = ChunkRelay(answer, cancelled, turn.deadline)
        finish = ""
        try:
            for batch in self.client.stream_chat(body, relay, trace_headers(turn.job.trace_id)):
                if cancelled.is_set():
                    raise StreamAborted
                deltas: list[str] = []
                for chunk in batch:
                    sink.append_reasoning(deltas, chunk.reasoning)
                    sink.append_text(deltas, chunk.content)
                    finish = chunk.finish_reason or finish
                    if chunk.usage:
                        answer.usage = chunk.usage
                sink.write(deltas)
                if time.monotonic() > turn.deadline:
                    raise BackendTimeout(f"answer ran past {turn.rules.max_seconds:.0f}s", code="total_timeout")
        except BackendHTTPError as exc:
            if exc.status in MISCONFIGURED:
                logger.warning(
                    "%s refused the call with HTTP %s: check OPENAI_BASE_URL, OPENAI_API_KEY and OPENAI_MODEL",
                    SERVER,
                    exc.status,
                )
                raise BackendHTTPError(exc.status, "misconfigured", exc.message) from exc
            raise
        return finish

    def _request(self, job: StreamJob, history: list[tuple[str, str]], images: list[str]) -> dict:
        """The chat completion's body: system prompt, earlier turns, the question (and its images)."""
        messages = []
        if self.settings.system_prompt:
            messages.append({"role": "system", "content": self.settings.system_prompt})
        for question, reply in history:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        question: str | list = job.query
        if images:
            question = [{"type": "text", "text": job.query}] if job.query else []
            question += [{"type": "image_url", "image_url": {"url": url}} for url in images]
        messages.append({"role": "user", "content": question})
        return {
            **self.extra,
            "model": self.settings.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": messages,
            "user": job.dify_user,
        }

    def _images(self, job: StreamJob) -> tuple[list[str], str]:
        """The user's images as data URLs (OPENAI_VISION), and the key of a note on what was left out ("").

        Raises:
            Declined: nothing usable is left and the user typed no words to ask with.
        """
        images, refused, failed = [], set(), 0
        for kind, url, *aeskey in job.attachments:
            if kind != IMAGE or not self.settings.vision:
                refused.add(kind)
                continue
            try:
                data, _ = self.media.fetch_inbound(url, MAX_IMAGE_BYTES, *aeskey)
            except MediaError as exc:
                logger.warning("could not read an image the user sent: %s", exc)
                failed += 1
                continue
            mime = sniff(data)[1] or "image/png"
            images.append(f"data:{mime};base64,{base64.b64encode(data).decode()}")
        if not job.attachments:
            return [], ""
        if not images and not job.typed_query:
            if failed:
                raise Declined("media_failed", failed=True)
            raise Declined("images_unsupported" if refused == {IMAGE} else "files_unsupported")
        if refused:
            return images, "images_ignored" if refused == {IMAGE} else "media_partial"
        return images, "media_partial" if failed else ""

    def _remember(self, job: StreamJob, conversation_id: str, shown: str) -> None:
        """The conversation goes on from this turn: its id for the user's next message, the turn in its history."""
        member = (job.aibotid, job.chatid, job.conversation_member)
        best_effort(lambda: self.conversations.remember(*member, conversation_id), "remembering the conversation")
        if shown:
            best_effort(lambda: self.turns.add(conversation_id, job.query, shown), "keeping the turn")


def _not_taken(exc: Exception) -> bool:
    """Whether the call provably did not reach the model, or was refused before any answer: refused (429, any 5xx
    status: the server answered with an error, no text), or not reached at all. A connection that broke after the
    request went whole may have started an answer: never asked again."""
    if isinstance(exc, BackendHTTPError):
        return exc.status == 429 or (exc.status is not None and exc.status >= 500)
    return never_taken(exc)
