"""The request side of streaming: open a stream for a new message, and answer WeCom's polls from Redis.

Both run on whichever replica WeCom happens to call. A new message creates its stream atomically with the msgid
dedup key and the user's in-flight slot, so a WeCom retry on any replica gets the same stream id and the current
text instead of a second Dify call, and a fourth open bubble gets a polite refusal. A poll folds the unread deltas
in one Redis round trip and replies with the full text so far.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from services import metrics
from services.redis_conn import REDIS_FAILURES
from services.streams.bubble import BubbleRenderer, overflow_threshold, text_at_close
from services.streams.card_returns import REPLY_DEADLINE_SECONDS, CardReturns
from services.streams.delivery import Delivery
from services.streams.job import StreamJob
from services.streams.life import ANSWERED, BUSY, MESSAGE, Reply
from services.streams.poll_path import COUNTED, LATE, NEVER, FrameRecord, PollPath, Snapshot
from services.streams.record import DONE, EXPIRED, F
from services.streams.runner import StreamRunner
from services.streams.store import CREATED, EXISTING, LIMITED, StreamStore, first_attempt
from services.streams.worker import StreamWorker
from services.texts import Texts
from services.wecom.limits import BUBBLE_WINDOW_SECONDS
from services.wecom.messages import Inbound, stream_reply
from utils.logging import bind_log_context

logger = logging.getLogger(__name__)

# What a poll did when it closed a bubble before its answer ended (scripts.POLL).
CLOSING_EVENTS = ("closed_window", "closed_overflow")
# A callback read this long after its timestamp is answered after WeCom stopped waiting (about 5 s; the timestamp is
# in whole seconds, so the callback is at most a second younger): its poll does not count as showing a live bubble
# (scripts.POLL), so an answer whose only "poll" was such a reply still goes out through response_url. A WeCom repeat
# of a message, held by a frozen replica for 12 s, once made its answer count as shown: its user, told by the next
# try that the service was unavailable, never got it (the 10-minute Cluster run of 2026-11-27, seed 12).
SURELY_UNTAKEN_SECONDS = 6.0


def new_stream_id() -> str:
    """A fresh, unguessable stream id (also the id WeCom polls with, and the answer's feedback id); never one that
    begins with "-", which an operator's command line would take for an option."""
    while True:
        stream_id = secrets.token_urlsafe(16)
        if not stream_id.startswith("-"):
            return stream_id


def backend_kind(backends, route: str) -> str:
    """The kind of the backend of `route` ("" for a route no longer there: a form's run, whose worker says so)."""
    backend = backends.get(route)
    return backend.name if backend is not None else ""


def image_items(images: list[dict]) -> list[dict]:
    """msg_item entries for the final reply."""
    return [{"msgtype": "image", "image": {"base64": i["base64"], "md5": i["md5"]}} for i in images]


@dataclass(frozen=True, slots=True)
class Frame:
    """A long connection's poll of a stream (StreamService.frame): the reply to send, how many bytes of the
    stream's text it shows, what became of its record ("yes", or "late": Redis ran it past its deadline, and
    the frame must not go out), and a finished answer's files (JSON, "" for none)."""

    reply: dict
    shows: int
    recorded: str
    files: str = ""


@dataclass(frozen=True)
class StreamPolicy:
    """A bot's rules for its streams: its name (metrics, logs), how long its bubbles stream, and whether a group's
    members share one Dify conversation (GROUP_CONVERSATION=shared)."""

    bot: str = "default"
    window_seconds: int = BUBBLE_WINDOW_SECONDS
    shared_groups: bool = False


class StreamService:
    """Opens streams and answers polls; the background work is the StreamWorker's. The bot's `delivery` (one per
    WeCom mode) says where a new answer runs and how what a bubble cannot show reaches the user."""

    def __init__(
        self,
        store: StreamStore,
        runner: StreamRunner,
        worker: StreamWorker,
        texts: Texts,
        bubble: BubbleRenderer,
        owner: str,
        delivery: Delivery,
        policy: StreamPolicy,
    ):
        self.bot = policy.bot
        self.shared_groups = policy.shared_groups
        self.window_seconds = policy.window_seconds
        self.store = store
        self.poll_path = PollPath(store)
        self.runner = runner
        self.worker = worker
        self.texts = texts
        self.bubble = bubble
        self.owner = owner
        self.overflow_bytes = overflow_threshold(bubble)
        self.delivery = delivery
        self.card_returns = CardReturns()  # its thread starts on the first poll that needs it

    def open(
        self,
        message: Inbound,
        query: str,
        typed_query: bool = True,
        attachments: list[tuple[str, ...]] | None = None,
        route: str = "",
    ) -> dict:
        """Start answering `message` (or, for a retried msgid, show the stream already started for it). A process that
        drains or is full refuses a new answer it would run itself (callback mode: WeCom tries again elsewhere), not
        one that waits in a queue for any serving process (a long connection's)."""
        if not self.has_room():
            existing = self.store.reads.stream_for_msgid(message.msgid)
            if existing:
                return self._dedup(existing, message)
            key = "busy" if self.runner.accepting else "shutting_down"
            self.count(key)
            logger.warning("not taking a new stream: %s", key)
            return self.finish_at_once(self.texts.say(key), message, BUSY)

        job = StreamJob(
            stream_id=message.stream_id or new_stream_id(),  # a kept message's: its bubble's (callback/spool.py)
            msgid=message.msgid,
            userid=message.userid,
            aibotid=message.aibotid,
            chatid=message.chatid,
            query=query,
            typed_query=typed_query,
            response_url=message.response_url,
            attachments=attachments or [],
            attempt=first_attempt(self.owner),
            shared_chat=self.shared_groups and message.is_group,
            route=route,
        )
        stream_id = job.stream_id
        fields = {
            "msgid": message.msgid,
            "userid": message.userid,
            "chatid": message.chatid,
            "chattype": message.chattype,
            "msgtype": message.msgtype,
            "aibotid": message.aibotid,
            "response_url": message.response_url,
            "backend": backend_kind(self.backends, route),
            "trace_id": job.trace_id,
            **job.request_fields(),
            **self.delivery.tracking(message),  # in the stream's first write: it waits for a replica (replication.py)
        }
        outcome, stream_id = self.store.create(
            stream_id, message.msgid, job.attempt, message.aibotid, message.userid, fields
        )
        if outcome == EXISTING:
            return self._dedup(stream_id, message)
        if outcome != CREATED:
            return self._refuse(job, outcome)
        self.delivery.dispatch(job, self._start)
        self.count("opened")
        bind_log_context(stream=stream_id)
        logger.info("stream %s opened", stream_id)
        return stream_reply(stream_id, self.bubble.live(""), finish=False, feedback_id=stream_id)

    @property
    def backends(self):
        """The bot's backends by route ("": its own; services/streams/backend.py), which its worker asks for
        answers."""
        return self.worker.backends

    def has_room(self) -> bool:
        """Whether a new answer would be taken here now (not by a process that drains or is full, when it would
        run the answer itself)."""
        return not self.delivery.runs_here or self.runner.has_capacity()

    def continue_form(self, form, response_url: str) -> None:
        """Go on with a run after its form's answer as a message of its own (its bubble no longer waits): a stream
        no WeCom bubble polls, whose answer goes out through `response_url` (callback mode) or the outbox's
        aibot_send_msg (long-connection mode). `form`: the claimed FormRecord."""
        job = StreamJob(
            stream_id=new_stream_id(),
            msgid=f"form:{form.task_id}",
            userid=form.userid,
            aibotid=form.aibotid,
            chatid=form.chatid,
            response_url=self.delivery.separate_url(response_url),
            attempt=first_attempt(self.owner),
            form_task=form.task_id,
            shared_chat=self.shared_groups and bool(form.chatid),
            route=form.route,
        )
        fields = {
            "msgid": job.msgid,
            "userid": job.userid,
            "chatid": job.chatid,
            "aibotid": job.aibotid,
            "response_url": job.response_url,
            "form_task": form.task_id,
            "shared_chat": "1" if job.shared_chat else "",
            "route": job.route,
            "backend": backend_kind(self.backends, job.route),
            "trace_id": job.trace_id,
            "workflow_run_id": form.form.run_id,  # a poll (the outbox's) may resume it elsewhere
        }
        self.store.open_stream(job.stream_id, job.attempt, job.aibotid, job.userid, fields)
        self.delivery.opened_separately(job)
        bind_log_context(stream=job.stream_id)
        logger.info("the run goes on after form %s as a message of its own", form.task_id)
        self._start(job)

    def answer_at_once(self, message: Inbound, answer: Callable[[], str]) -> dict:
        """A finished reply to a message that opens no Dify call (a typed form value), made once per msgid: a WeCom
        retry of the message, on any replica, gets the same reply and does nothing again."""
        stream_id, attempt = message.stream_id or new_stream_id(), first_attempt(self.owner)
        fields = {"msgid": message.msgid, "userid": message.userid, "chatid": message.chatid}
        self.store.open_stream(stream_id, attempt, message.aibotid, message.userid, fields)
        holder = self.store.claim_msgid(message.msgid, stream_id)
        if holder != stream_id:
            self.store.discard(stream_id)
            return self._dedup(holder)
        note = answer()
        self.store.finish(stream_id, attempt, DONE, {"note": note})
        self.count("form_value")
        return stream_reply(stream_id, note, finish=True)

    def run_queued(self, stream_id: str, opener: str) -> bool:
        """Answer a stream another process opened and queued (`opener`: its first attempt), here, if it is still
        waiting for someone."""
        if not self.runner.has_capacity():
            return False
        taken = self.store.take(stream_id, opener, self.owner)
        if taken is None:
            return False
        job = StreamJob.from_meta(stream_id, taken.meta, taken.attempt)
        job.counted_call = taken.counted_call
        self._start(job)
        return True

    def _dedup(self, stream_id: str, message: Inbound | None = None) -> dict:
        """A WeCom retry of a message whose stream exists: the same stream, as far as it has come (on a long
        connection, answered from now on on the retry's req_id: a redelivery comes on a new connection). A card that
        waits is left to the stream's polls: WeCom may keep the first delivery's bubble and drop this reply."""
        self.count("dedup")
        metrics.DEDUP_HITS.labels(self.bot).inc()
        logger.info("repeated msgid; answering with its stream %s", stream_id)
        reply = self.poll(stream_id, hand_card=False, waited=message.waited if message is not None else 0.0)
        if message is not None and not reply["stream"].get("finish"):
            self.delivery.track(stream_id, message)
        return reply

    def _refuse(self, job: StreamJob, outcome: str) -> dict:
        """The user may not open another bubble now: the stream ends at once with the reason, so a WeCom retry of
        the message (which finds it through its msgid) gets the same answer."""
        self.count(outcome)
        note = self.texts.say("too_many_in_flight" if outcome == LIMITED else "rate_limited")
        logger.info("not answering: %s", outcome)
        self.store.finish(job.stream_id, job.attempt, DONE, {"note": note, "error": outcome})
        return stream_reply(job.stream_id, note, finish=True)

    def count(self, outcome: str) -> None:
        """Count what became of a user's message (wecom_messages_total)."""
        metrics.MESSAGES.labels(self.bot, outcome).inc()

    def _start(self, job: StreamJob) -> None:
        self.runner.start(job, lambda cancelled, lease: self.worker.run(job, cancelled, lease), self.store, self.bot)

    def finish_at_once(
        self,
        note: str,
        message: Inbound | None = None,
        outcome: str = ANSWERED,
        kind: str = MESSAGE,
        redis_away: bool = False,
    ) -> dict:
        """A finished reply to a new message that needs no stream (a command, a refusal, Redis away: `redis_away`);
        with the `message`, its audit row says so (`outcome`; `kind` stop for a /stop)."""
        if message is not None:
            self.store.life.replied.send(Reply(self.bot, message, note, outcome, kind, self.owner, redis_away))
        return stream_reply((message and message.stream_id) or new_stream_id(), note, finish=True)

    def poll(self, stream_id: str, hand_card: bool = True, waited: float = 0.0) -> dict:
        """The reply to a stream-refresh callback: the full text so far, finish once the bubble is done (with
        `hand_card` off, without a card that waits: it is left for a later poll). `waited`: how long the callback
        had waited before it was read (WeCom's signed timestamp on), which a reply carrying a card must not add to
        past what WeCom waits for it.

        A stream whose replica died before showing anything is restarted here, once, if this replica has room.
        """
        return self._reply(stream_id, self._look(stream_id, hand_card, waited=waited))

    def poll_known(self, stream_id: str, waited: float = 0.0) -> dict | None:
        """A poll's reply, or None for a stream Redis does not know (which may be a kept message's bubble:
        services/callback/spool.py)."""
        snapshot = self._look(stream_id, True, waited=waited)
        return self._reply(stream_id, snapshot) if snapshot is not None else None

    def unknown(self, stream_id: str) -> dict:
        """The finished reply to a poll of a stream nobody knows (expired, or never ours)."""
        return stream_reply(stream_id, self.texts.say("unknown_stream"), finish=True)

    def frame(self, stream_id: str, record: FrameRecord) -> Frame:
        """A long connection's next frame of a stream: what a poll replies, recorded by the same poll as what the
        bubble shows once the frame goes out (the holder's frame pump, services/longconn/replies.py)."""
        snapshot = self._look(stream_id, True, record)
        if snapshot is None:
            return Frame(self._reply(stream_id, None), 0, "")
        return Frame(self._reply(stream_id, snapshot), snapshot.shows, snapshot.recorded, snapshot.files)

    def _reply(self, stream_id: str, snapshot: Snapshot | None) -> dict:
        if snapshot is None:
            return self.unknown(stream_id)
        if snapshot.close_reason:
            shown = text_at_close(snapshot.text, snapshot.closed_bytes)
            content = self.bubble.closed(shown, snapshot.close_reason, snapshot.has_response_url)[0]
            logger.info("bubble finished before its answer did (%s)", snapshot.close_reason)
            return stream_reply(stream_id, content, finish=True, feedback_id=stream_id)
        if snapshot.active:
            if snapshot.card:
                metrics.CARDS.labels(self.bot, "form").inc()
                logger.info("the form's card goes out with this reply")
            content = self.bubble.live(snapshot.text, snapshot.prompt)
            return stream_reply(stream_id, content, finish=False, feedback_id=stream_id, card=snapshot.card)
        content = self.bubble.final(snapshot.text, snapshot.note, snapshot.has_response_url)[0]
        logger.info("bubble finished: %s", snapshot.status)
        if snapshot.card:
            metrics.CARDS.labels(self.bot, "suggestions").inc()
        images = image_items(snapshot.images)
        return stream_reply(stream_id, content, finish=True, feedback_id=stream_id, images=images, card=snapshot.card)

    def look(self, stream_id: str) -> Snapshot | None:
        """A poll's work on a stream, without a reply or a card handed out (a watch over streams whose rest goes out
        as a message of its own); not counted as a poll of its bubble, which WeCom may never have made. An ended
        answer is owed, through its response_url, what its bubble did not show of the text Redis holds (`owed`):
        closed early and given up (its replica is gone), that with the note that the answer was interrupted; ended
        by its owner, what that owner's finisher sends (Finisher._send_rest); '' when the bubble showed it all."""
        snapshot = self._look(stream_id, hand_card=False, counted=NEVER)
        if snapshot is None or snapshot.active:
            return snapshot
        text, note, reason = snapshot.text, snapshot.note, snapshot.close_reason
        if EXPIRED not in (snapshot.event, snapshot.status):
            snapshot.owed = self.bubble.rest(text, note, reason, snapshot.closed_bytes)
        elif reason:  # given up: the note alone when nothing is left unshown (a live bubble shows it itself)
            unshown = self.bubble.unshown(text, snapshot.closed_bytes, reason)
            snapshot.owed = self.bubble.remainder(unshown, note) if unshown.strip() else note
        return snapshot

    def _look(
        self,
        stream_id: str,
        hand_card: bool,
        record: FrameRecord | None = None,
        waited: float = 0.0,
        counted: str = COUNTED,
    ) -> Snapshot | None:
        """A poll's work in Redis and what follows from it here: a stream taken over or resumed starts on this
        replica, a bubble that just closed frees its user's slot (and, closed before its answer ended, is watched
        until the answer ends; so is one a poll finds closed under a running answer, in case the poll that closed it
        lost its reply). A poll read long after it came (`waited`) is counted LATE. None for an unknown stream."""
        taker = self.owner if self.runner.has_capacity() else ""
        token, started = secrets.token_hex(6), time.monotonic()
        counted = LATE if counted == COUNTED and waited > SURELY_UNTAKEN_SECONDS else counted
        try:
            snapshot = self.poll_path.poll(
                stream_id,
                self.window_seconds,
                self.overflow_bytes,
                self.texts.say("orphaned"),
                taker,
                taker_runs_it=self.runner.is_running(stream_id),
                token=token,
                hand_card=hand_card,
                record=record,
                counted=counted,
            )
        except REDIS_FAILURES:
            self.card_returns.later(self.poll_path, stream_id, token)  # its script may yet run: its card comes back
            raise
        late = snapshot is not None and snapshot.card and _late(started, waited)
        if late and self.card_returns.now(self.poll_path, stream_id, token):  # WeCom may not take this reply
            snapshot.card = None  # the next poll's carries it
        if snapshot is None:
            return None
        life = self.store.life
        if snapshot.freed_inflight_key:
            self.store.release_inflight(snapshot.freed_inflight_key, stream_id)
        if snapshot.event in CLOSING_EVENTS or (snapshot.close_reason and snapshot.active and counted != NEVER):
            reason = snapshot.event if snapshot.event in CLOSING_EVENTS else ""  # "": found closed, maybe unheard of
            life.closed_early.send(stream_id, reason=reason, has_response_url=snapshot.has_response_url)
        elif snapshot.event == EXPIRED:  # given up: its owner is gone
            if not self._ended_as_kept(stream_id, snapshot):
                life.expired.send(stream_id)
            life.ended.send(stream_id)
        elif snapshot.taken_over or snapshot.resumed:
            life.handed_over.send(stream_id, how=snapshot.event)
        if snapshot.taken_over or snapshot.resumed:
            meta = self.store.reads.meta(stream_id)
            if snapshot.taken_over:
                logger.warning("stream %s lost its replica before showing anything; restarting it here", stream_id)
                job = StreamJob.from_meta(stream_id, meta, snapshot.attempt)
            else:
                logger.warning("stream %s lost its replica; streaming its Dify run again here", stream_id)
                job = StreamJob.resumed(stream_id, meta, snapshot.attempt)
            job.taken_over = True
            self._start(job)
        return snapshot

    def _ended_as_kept(self, stream_id: str, snapshot: Snapshot) -> bool:
        """A stream this poll gave up (its owner is gone, and its answer cannot be followed again) whose end had gone
        out while Redis was away, from a process that exited before Redis came back (Finisher.finish_kept_end): it
        ends as that process would have ended it, and so does this poll's reply (True), not as interrupted."""
        kept = self.delivery.kept_end(stream_id)
        if kept is None:
            return False
        logger.warning("stream %s lost its replica after its end went out without Redis; ending it so", stream_id)
        status, fields = kept
        self.store.record(stream_id, {**fields, F.status: status, F.error: ""})
        snapshot.event, snapshot.status, snapshot.note = "", status, fields.get(F.note, "")  # (nothing more is owed)
        return True


def _late(started: float, waited: float) -> bool:
    """Whether this reply may come later than WeCom waits for it: the poll took long, or the callback had waited long
    (`waited`) before it was read (a frozen process, a queue)."""
    took = time.monotonic() - started
    return max(took, waited) > REPLY_DEADLINE_SECONDS
