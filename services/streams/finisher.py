"""The end of every answer: its final state in Redis, and what the bubble could not show sent once as a message of
its own, the way the bot's WeCom mode offers (services/streams/delivery.py). The final state is retried through a
Redis outage while WeCom may still poll the bubble; what happens past that patience, and why nothing then reaches
the user twice: docs/architecture.md, "Many replicas" ("Redis stalls or restarts").
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import redis

from services import metrics
from services.outage import best_effort, best_effort_value, delays_for, steady_delays, through_outage
from services.redis_conn import REDIS_FAILURES
from services.streams.answer import FLUSH_TIMEOUT, Answer, StreamAborted, keep_in_step, write_whole
from services.streams.bubble import (
    SEPARATELY,
    BubbleRenderer,
    overflow_threshold,
)
from services.streams.delivery import Delivery
from services.streams.job import StreamJob
from services.streams.life import ANSWERED, MESSAGE, Reply
from services.streams.record import DONE
from services.streams.store import Finished, StreamConflict, StreamStore
from services.texts import Texts
from services.wecom.limits import BUBBLE_WINDOW_SECONDS, fits
from services.wecom.messages import Inbound
from utils.text import utf8_len

logger = logging.getLogger(__name__)

# How long past the bubble's window the stream is still marked as sent separately, should Redis come back late.
MARK_GRACE_SECONDS = 60.0
# A bubble this close to its window's end may be closed early by a poll on another replica's clock.
WINDOW_MARGIN_SECONDS = 5.0


@dataclass(eq=False)
class Finisher:
    """Records how an answer ended and delivers the rest."""

    store: StreamStore
    delivery: Delivery  # what the bubble cannot show goes out this way (response_url, or the outbox)
    bubble: BubbleRenderer
    texts: Texts
    bot: str = "default"
    window_seconds: int = BUBBLE_WINDOW_SECONDS
    # A process that is stopping waits no longer for Redis (the answer goes out now); one that closed waits for
    # nothing (what only Redis can settle is left to it).
    draining: Callable[[], bool] = lambda: False
    closed: Callable[[], bool] = lambda: False

    def finish(self, job: StreamJob, answer: Answer, status: str, **fields: str) -> Finished | None:
        """Write what is queued and record the final state (with the reply images, and for a done answer its
        feedback target). Returns how the bubble ended, or None when another replica or a poll ended it."""
        note = fields.get("note", "")
        patience = job.created_at + self.window_seconds - time.time()  # while WeCom may still poll the bubble
        finish_id = secrets.token_hex(8)  # every try of this finish carries it: a try whose reply was lost is repeated
        record = partial(self._record, job, answer, status, fields, finish_id)
        if self._rest_follows(job, answer, note):  # said before the end: a death right after it loses no rest
            self.store.life.rest_owed.send(job.stream_id)
        try:
            finished = self._record_final(record, patience, partial(self._shown_known, job, answer))
        except StreamAborted:
            logger.info("stream was taken over by another replica; final state not written")
            return None
        except REDIS_FAILURES:
            if self.delivery.waits_for_redis or self.closed():
                logger.error("Redis stayed unavailable past the bubble's window; the answer is left to a takeover")
                return None
            logger.error("Redis stayed unavailable; sending what the bubble has not shown through response_url")
            self._finish_without_redis(job, answer, status, fields, note)  # (the whole answer: the last resort)
            return None
        if finished is not None:
            if not finished.held:  # a failover could take the end back, and nothing written later would find it
                self.store.durable.until_held(partial(self._ended_again, record), "an answer's end")
            metrics.STREAM_OUTCOMES.labels(self.bot, status).inc()
            metrics.STREAM_SECONDS.labels(self.bot, job.route).observe(max(0.0, time.time() - job.created_at))
            self._free_slot(job, finished)
            self._send_rest(job, answer, finished, note)
        elif answer.detached:
            metrics.STREAM_OUTCOMES.labels(self.bot, "closed_elsewhere").inc()
            self._send_unshown(job, answer, note)
        else:
            # closed elsewhere, or already final: an earlier try of this write ran, and only its reply was lost
            logger.info("stream was already final; final state not written again")
        return finished

    def _rest_follows(self, job: StreamJob, answer: Answer, note: str) -> bool:
        """Whether the answer's bubble cannot show it whole, so that its rest goes out as a message of its own."""
        return not job.separate and self.delivery.reaches(job) and not fits(answer.text, note)

    @staticmethod
    def _ended_again(record: Callable[[], Finished | None]) -> bool:
        """The answer's end made again (the same finish: a stream that holds it answers as before), the list
        written whole first if a failover took deltas back with it; True once a replica holds it, or the stream is
        no longer this answer's to end.

        Raises:
            redis.RedisError (or a cluster error): Redis did not answer (it is tried again later).
        """
        try:
            finished = record()
        except StreamAborted:
            return True
        return finished is None or finished.held

    def _free_slot(self, job: StreamJob, finished: Finished) -> None:
        if finished.inflight_key:
            best_effort(
                lambda: self.store.release_inflight(finished.inflight_key, job.stream_id),
                "freeing the user's open-bubble slot",
            )

    def _record(
        self, job: StreamJob, answer: Answer, status: str, fields: dict[str, str], finish_id: str
    ) -> Finished | None:
        """One attempt: flush the writer, then the final state (None if the stream is no longer ours to end).

        Raises:
            redis.RedisError: Redis did not answer (the caller tries again).
            StreamAborted: another replica owns the stream now.
        """
        if answer.writer is not None and not answer.detached:
            answer.writer.flush(FLUSH_TIMEOUT)
            keep_in_step(answer, self.store, job.attempt, job.stream_id)
        if answer.detached:
            return None
        feedback = (
            {"message_id": answer.message_id, "user": job.dify_user, "route": job.route} if status == DONE else None
        )
        finish = partial(
            self.store.finish,
            job.stream_id,
            job.attempt,
            status,
            {**fields, **_dify_ids(answer)},
            images=answer.images,
            feedback=feedback if answer.message_id else None,
            finish_id=finish_id,
            window_seconds=self.window_seconds,  # (past it, a bubble no poll closed is closed at what it shows)
        )
        try:
            finished = finish(chunks=_confirmed_deltas(answer))
        except StreamConflict:
            # Appends Redis had confirmed are gone and none came after to find it (a failover lost them): the list is
            # written whole first, as an append's conflict would have it (seed 19's Sentinel run lost two sentences).
            logger.warning(
                "at the answer's end its list lacked deltas it had taken (a Redis failover?); writing it whole"
            )
            write_whole(answer, self.store, job.attempt, job.stream_id)
            if answer.detached:
                return None
            try:
                finished = finish(chunks=_confirmed_deltas(answer))
            except StreamConflict as exc:  # changed again under us: the outage loop tries the whole end again
                raise redis.RedisError("the stream's list changed while its answer was written whole") from exc
        if finished is not None and finished.orphaned:
            # The bubble ended with "interrupted, ask again", yet this replica has the answer: it lost only its
            # lease (a Redis failover can roll one back). Closed elsewhere, then: the whole answer goes out.
            logger.warning("a poll gave this answer up as orphaned while it was still running here")
            answer.detached = True
            return None
        return finished

    def _send_unshown(self, job: StreamJob, answer: Answer, note: str) -> None:
        """The bubble was finished by a poll that gave the answer up (its lease was gone): send what it did not
        show, once; the whole answer if what it showed is not where the answer begins, or cannot be read (Redis lost
        it, or stayed away through the bubble's window and a minute: read through an outage until then)."""
        patience = self._graced_window(job)
        shown = partial(self.store.reads.shown_when_given_up, job.stream_id)
        try:
            text = through_outage(shown, "reading what was shown", steady_delays(patience), give_up=self.closed)
        except REDIS_FAILURES:
            if self.closed():
                logger.error("the process closed before Redis said what the given-up bubble showed; nothing sent")
                return
            text = None
        if not text or not answer.text.startswith(text) or not self.delivery.reaches(job):
            sent = self._send_whole(job, answer, note, given_up=True)
        else:
            sent = self._respond(job, self.bubble.remainder(answer.text[len(text) :], note), "rest", given_up=True)
        if sent:  # the user has the whole answer after all, and its note: its audit row is written again, saying so
            best_effort(lambda: self._record_given(job, _given(answer, note)), "recording what was sent")

    def _record_given(self, job: StreamJob, given: str) -> None:
        if self.store.record(job.stream_id, {"answer_given": given}):
            self.store.life.ended.send(job.stream_id)
            return
        # The stream is gone: a failover took back its opening, which no replica held (its worker found it gone
        # and sent the answer whole). Its record is then what this worker knows, as a reply's.
        logger.warning("the answer's stream was gone at its end (a Redis failover?); its record is this worker's")
        self.store.life.replied.send(Reply(self.bot, _message_of(job), given, ANSWERED, MESSAGE, job.attempt))

    def _send_whole(self, job: StreamJob, answer: Answer, note: str, given_up: bool = False) -> bool:
        """The bubble was finished by someone else (or cannot be updated): send the whole answer once. True if
        WeCom took it."""
        if not self.delivery.reaches(job):
            logger.warning("the answer could not be delivered: no response_url")
            return False
        message = self.bubble.remainder(answer.text, note, header_key="full_answer")
        return self._respond(job, message, "whole_answer", given_up)

    def _respond(self, job: StreamJob, message: str, kind: str, given_up: bool = False) -> bool:
        """Send `message` (the answer's `kind`: rest or whole_answer) as a message of its own; True if it went out
        (`given_up`: a poll gave the bubble up). Where the way goes through Redis (the outbox), it is tried while
        WeCom may still poll the bubble, and a minute more."""
        patience = self._graced_window(job)
        return self.delivery.send(job, message, kind, patience, given_up)

    def _record_final(
        self, record: Callable[[], Finished | None], patience: float, shown_known: Callable[[], bool]
    ) -> Finished | None:
        """`record()` the answer's final state, through a Redis outage while WeCom may still poll the bubble (a
        draining process waits no longer). In callback mode a lasting outage is raised then, when what the bubble
        shows is known without Redis (`shown_known()`): what it has not shown goes out through response_url. Where
        only Redis knows it (a long connection's bubble shows what its holder sent, and its frames and rests all go
        through Redis; a callback bubble that a poll may have closed early at less), the end waits for Redis
        through a minute's grace past the window too, draining or not, so that what follows goes out, never the
        whole answer over what the bubble showed (a process that dies meanwhile leaves the stream to a takeover, as
        any death does).

        Raises:
            StreamAborted: another replica took the stream over.
            redis.RedisError (or a cluster error): Redis stayed away.
        """
        what = "recording the final state of the answer"
        try:
            return through_outage(record, what, delays_for(patience), give_up=self.draining)
        except REDIS_FAILURES:
            if not self.delivery.waits_for_redis and shown_known():
                raise
            logger.error("Redis stayed unavailable at the answer's end; waiting for it: only it knows what was shown")
            delays = steady_delays(max(0.0, patience) + MARK_GRACE_SECONDS)
            return through_outage(record, what, delays, give_up=self.closed)

    def _finish_without_redis(
        self, job: StreamJob, answer: Answer, status: str, fields: dict[str, str], note: str
    ) -> None:
        """Redis stayed away at the answer's end: what the bubble has not shown goes out at once as a message of its
        own (the whole answer when what it shows is not known), and the stream is finished, as soon as Redis is back,
        at the text the bubble held, saying so: nothing reaches the user twice, and no poll resumes, restarts or
        gives up an answer the user has whole."""
        if answer.writer is not None:
            answer.writer.wait_settled()  # an append whose reply never came lands by its deadline or never
            answer.writer.abandon()
        shown = self._surely_shown(job, answer)
        rest = answer.text[shown:]
        # What the user has, the bubble and the message together: the audit row's answer (Redis holds the shown part)
        given = {"answer_given": _given(answer, note)}
        if not shown:
            if self._send_whole(job, answer, note):
                self._mark(job, status, {**fields, **given, "note": self.texts.say("sent_separately")})
        elif not rest.strip():
            self._mark(job, status, fields)  # the bubble has it all: only its end could not be recorded
        elif self._respond(job, self.bubble.remainder(rest, note), "rest"):
            closed = {"close_reason": SEPARATELY, "closed_bytes": str(utf8_len(answer.text[:shown]))}
            self._mark(job, status, {**fields, **given, "note": self.texts.say("rest_sent_separately"), **closed})

    def _graced_window(self, job: StreamJob) -> float:
        """Seconds left of the bubble's window, and a minute past it: how long an end that needs Redis waits for it."""
        return max(0.0, job.created_at + self.window_seconds - time.time()) + MARK_GRACE_SECONDS

    def _shown_known(self, job: StreamJob, answer: Answer) -> bool:
        """Whether what the bubble shows is known without Redis: nothing (the answer has no bubble, or Redis holds
        none of it), or the text Redis confirmed holding (`_surely_shown`)."""
        writer = answer.writer
        if job.separate or writer is None:
            return True
        writer.wait_settled()
        return writer.confirmed_chars() == 0 or self._surely_shown(job, answer) > 0

    def _surely_shown(self, job: StreamJob, answer: Answer) -> int:
        """How many characters at the answer's start its bubble holds for sure, and can show whole with a note:
        what Redis confirmed holding, provided no poll can have closed the bubble early at less (it is inside its
        window and shorter than one bubble). 0 when that is not known."""
        writer = answer.writer
        confirmed = writer.confirmed_chars() if writer is not None and not answer.detached else None
        if not confirmed or job.separate:
            return 0
        if time.time() > job.created_at + self.window_seconds - WINDOW_MARGIN_SECONDS:
            return 0
        shown = answer.text[:confirmed]
        if utf8_len(shown) > overflow_threshold(self.bubble):
            return 0
        return confirmed if self.bubble.closed(shown, SEPARATELY, True)[1] >= len(shown) else 0

    def _mark(self, job: StreamJob, status: str, fields: dict[str, str]) -> None:
        """The answer went out through response_url while Redis was away: finish the stream with `fields` once
        Redis is back (this thread keeps trying meanwhile, and its lease stays renewed), so that no poll resumes or
        restarts it, or ends it as interrupted. The end is kept by the delivery first: should this process exit
        before Redis is back, the stream's takeover ends it so (`finish_kept_end`)."""
        fields = {**fields, "delivered": "response_url", "rest_sent": "yes"}  # (no watch makes it again)
        self.delivery.keep_end(job, status, fields)
        self._write_mark(job, status, fields)

    def _write_mark(self, job: StreamJob, status: str, fields: dict[str, str]) -> None:
        """Finish the stream with a marked end, tried while WeCom may poll the bubble, and a minute more."""
        patience = self._graced_window(job)
        marked = best_effort_value(
            lambda: self.store.finish(job.stream_id, job.attempt, status, fields),
            "marking the stream as sent through response_url",
            steady_delays(patience),  # once Redis is back, within a second: a poll gives a lost lease 3 s
        )
        if marked is not None and marked.inflight_key:
            logger.info("stream marked as sent through response_url")
            self._free_slot(job, marked)

    def finish_kept_end(self, job: StreamJob) -> bool:
        """A takeover's first look: an earlier attempt sent this answer's end out while Redis was away, and its
        process exited before Redis came back to mark the stream so (`_mark`). The stream is ended as that attempt
        would have (True), and nothing is asked again: the user has the answer."""
        kept = self.delivery.kept_end(job.stream_id)
        if kept is None:
            return False
        logger.warning("this answer's end went out while Redis was away, from a process now gone; ending it so")
        status, fields = kept
        self._write_mark(job, status, fields)
        return True

    def _send_rest(self, job: StreamJob, answer: Answer, finished: Finished, note: str) -> None:
        """Send as a message of its own, once, what the bubble could not show (it closed early or overflowed, or no
        poll ever showed it); an answer with no bubble (the rest of a run after a form) goes out whole."""
        if job.separate:
            self.delivery.answer_separately(job, self.bubble.separate(answer.text, note))
            return
        if not self.delivery.reaches(job):
            return
        if not finished.close_reason and self.delivery.bubble_lost(job):
            self._send_whole(job, answer, note)
            return
        message = self.bubble.rest(answer.text, note, finished.close_reason, finished.closed_bytes)
        if not message:
            return
        delivered = self._respond(job, message, "rest")
        best_effort(
            lambda: self.store.record(job.stream_id, {"rest_sent": "yes" if delivered else "failed"}),
            "recording the response_url delivery",
        )


def _message_of(job: StreamJob) -> Inbound:
    """The user's message, as far as its job keeps it."""
    kind = job.attachments[0][0] if job.attachments and job.attachments[0] else "text"
    chattype = "group" if job.chatid else "single"
    return Inbound(kind, job.msgid, job.aibotid, chattype, job.chatid, job.userid, job.response_url, job.query)


def _given(answer: Answer, note: str) -> str:
    """The whole answer a user got in more than its bubble, with its note (`answer_given`: its audit row's answer)."""
    return f"{answer.text}\n\n{note}" if note else answer.text


def _confirmed_deltas(answer: Answer) -> int:
    """How many deltas the stream's list holds if every append its writer confirmed is still there (-1: no writer)."""
    return -1 if answer.writer is None else answer.writer.written


def _dify_ids(answer: Answer) -> dict[str, str]:
    """The Dify ids the answer came with, and how many matches of content rules it masked: kept in the final state
    for its audit row (services/audit)."""
    ids = {"message_id": answer.message_id, "conversation_id": answer.conversation_id}
    ids["masked"] = str(answer.mask.count) if answer.mask.count else ""
    return {name: value for name, value in ids.items() if value}
