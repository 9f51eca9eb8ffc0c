"""What a backend writes an answer with (services/streams/backend.py): its text and reasoning as they stream, the
whole answer replaced, fields of the stream hash. Deltas are batched by the caller (one network read's worth) and
handed to the stream's writer (services/streams/writer.py), which sends them without making anyone wait; content
rules mask them on the way (services/rules/mask.py), a possible match held until the next piece decides.

A model's reasoning is never part of the answer; shown (SHOW_REASONING), it comes first in a <think> block, which the
first answer text closes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from services import metrics
from services.redis_conn import REDIS_FAILURES
from services.streams.answer import FLUSH_TIMEOUT, Answer, StreamAborted, keep_in_step, write_whole
from services.streams.job import StreamJob
from services.streams.store import CLOSED, TAKEN, StreamStore

logger = logging.getLogger(__name__)

THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"


class AnswerSink:
    """One attempt's writes of its answer."""

    def __init__(
        self, job: StreamJob, answer: Answer, store: StreamStore, bot: str, backend: str, show_reasoning: bool = False
    ):
        self.job = job
        self.answer = answer
        self.store = store
        self.bot = bot
        self.backend = backend  # its kind, for the metrics
        self.show_reasoning = show_reasoning

    def append_text(self, deltas: list[str], text: str) -> None:
        """Answer text for the bubble, added to `deltas` (not yet written): after reasoning shown in a <think> block,
        the block is closed first; a status line goes."""
        if not text:
            return
        answer = self.answer
        if answer.progress is not None:
            answer.progress.text_came()
        if answer.thinking:
            deltas.append(THINK_CLOSE)
            answer.thinking = False
        answer.answered = True
        deltas.append(text)

    def append_reasoning(self, deltas: list[str], reasoning: str) -> None:
        """A model's reasoning, added to `deltas` in the <think> block it opens: only with SHOW_REASONING, and only
        before the answer."""
        answer = self.answer
        if not self.show_reasoning or answer.answered or not reasoning:
            return
        if not answer.thinking:
            deltas.append(THINK_OPEN)
            answer.thinking = True
        deltas.append(reasoning)

    def close_reasoning(self) -> None:
        """The answer ended with reasoning and no answer after it: its block is closed."""
        if self.answer.thinking:
            self.write([THINK_CLOSE.rstrip()])
            self.answer.thinking = False

    def write_fields(self, fields: dict[str, str], durable: bool = False) -> None:
        """Set fields of the stream hash, in order with the deltas before them (a form's prompt and card). `durable`:
        once everything before them is written, they are set again in a write a replica holds before this returns
        (StreamStore.set_durably): a form's card a failover lost would leave the user nothing to answer.

        Raises:
            StreamAborted: another replica owns the stream now.
        """
        self.answer.new_fields.update(fields)
        self.write([])
        if durable and not self.answer.detached:
            self._set_durably(fields)

    def _set_durably(self, fields: dict[str, str]) -> None:
        answer, job = self.answer, self.job
        try:
            answer.writer.flush(FLUSH_TIMEOUT)
            keep_in_step(answer, self.store, job.attempt, job.stream_id)
            result = CLOSED if answer.detached else self.store.set_durably(job.stream_id, job.attempt, fields)
        except REDIS_FAILURES as exc:  # the writer still holds them, and sends them when Redis is back
            logger.warning("could not wait for a replica to hold %s (%s)", "/".join(fields), exc)
            return
        if result == TAKEN:
            raise StreamAborted

    def write(self, deltas: list[str]) -> None:
        """Hand deltas (and new fields) to the stream's writer, which sends them without making us wait.

        Raises:
            StreamAborted: another replica owns the stream now.
        """
        answer = self.answer
        if answer.mask.active:
            deltas = self._masked(deltas)
        if deltas and not answer.text and not answer.resumed:  # the first words (or thoughts) the user sees
            waited = max(0.0, time.time() - self.job.created_at)
            metrics.FIRST_TOKEN_SECONDS.labels(self.bot, self.backend, self.job.route).observe(waited)
        answer.text += "".join(deltas)
        if answer.detached or not (deltas or answer.new_fields):
            return
        answer.writer.add(deltas, answer.new_fields)
        answer.new_fields = {}
        keep_in_step(answer, self.store, self.job.attempt, self.job.stream_id)

    def _masked(self, deltas: list[str]) -> list[str]:
        """The deltas as the content rules let them go on: masked, a tail that could still become a match held
        (services/rules/mask.py); all of it once the answer ended or paused for a form."""
        mask = self.answer.mask
        text = mask.admit("".join(deltas)) if deltas else mask.due()
        if self.answer.paused or self.answer.ended:
            text += mask.flush()
        return [text] if text else []

    def replace_text(self, text: str, deltas: Sequence[str] = ()) -> list[str]:
        """The whole answer becomes `text`: what came before (`deltas` not yet written, then everything else) is
        written first, then the stream's text is replaced (masked as the rules say). Returns the deltas still to
        write: none.

        Raises:
            StreamAborted: another replica owns the stream now.
        """
        self.write(list(deltas))
        self.answer.text = self.answer.mask.whole(text)
        write_whole(self.answer, self.store, self.job.attempt, self.job.stream_id)
        self.answer.answered = self.answer.answered or bool(text)
        self.answer.thinking = False
        return []

    def answer_so_far(self, deltas: list[str] = ()) -> str:
        """The answer text (without a <think> block) including `deltas` not yet written."""
        text = self.answer.text + "".join(deltas)
        return text.split(THINK_CLOSE, 1)[1] if THINK_CLOSE in text else text
