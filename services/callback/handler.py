"""The callback endpoint's logic, without Flask: open the envelope, parse, dispatch by msgtype, seal the reply.

Anything wrong with the request itself raises CallbackError (a 4xx). Once a callback is authentic, every failure
behind it becomes an encrypted, finished stream reply with a short note, so the user's bubble never spins; the
exceptions are a poll while Redis is down, answered 503 so WeCom polls again and the bubble keeps its text, and a new
message Redis cannot take, kept in the database with its bubble open (services/callback/spool.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from functools import partial

from services import metrics
from services.callback.envelope import Envelope
from services.callback.replay_guard import ReplayGuard
from services.callback.spool import CallbackSpool
from services.chat.dispatch import Dispatch, Patience
from services.chat.spool_rows import SPOOL_FAILURES
from services.outage import steady_delays
from services.redis_conn import REDIS_FAILURES
from services.streams.service import new_stream_id
from services.wecom import errors
from services.wecom.messages import Inbound, parse_inbound, stream_reply
from utils.logging import bind_log_context

logger = logging.getLogger(__name__)

# How long a callback's new message is taken again while Redis does not answer: a blip (one Cluster shard's link, a
# failover's last seconds) then costs no answer. The last try starts by then plus a pause, and a try that hangs ends
# at the client's 2 s timeout: the reply still reaches WeCom within the 5 s it waits for one.
CALLBACK_INTAKE_SECONDS = 2.0
CALLBACK_INTAKE_PAUSE = 0.5


class StoreUnavailable(Exception):
    """Redis (or, for a kept message's bubble, the database) did not answer while serving a poll; the route answers
    503 and WeCom polls again."""


class CallbackHandler:
    """Turns one raw callback into the reply to answer with: the envelope opened, a repeated event found, a poll of
    a bubble answered here, anything else through the mode-neutral dispatch (services/chat/dispatch.py)."""

    def __init__(
        self, envelope: Envelope, dispatch: Dispatch, replays: ReplayGuard, spool: CallbackSpool | None = None
    ):
        self.envelope = envelope
        self.dispatch = dispatch
        self.replays = replays
        self.spool = spool  # where a new message Redis cannot take waits for its bubble's poll (None: no database)
        self.intake = dispatch.intake
        self.streams = dispatch.streams
        self.events = dispatch.events
        self.bot = self.streams.bot

    def verify_url(self, query: Mapping[str, str]) -> str:
        """The plaintext echo for WeCom's URL check (CallbackError if it is not authentic)."""
        return self.envelope.verify_url(query)

    def handle(self, query: Mapping[str, str], body: bytes) -> dict | None:
        """The encrypted reply envelope for a POST callback, or None for an empty reply.

        Raises:
            CallbackError: the request is malformed, unsigned, stale or undecryptable; or a new message to a bot
                removed from BOTS_FILE (404).
            StoreUnavailable: a poll could not reach Redis.
        """
        opened = self.envelope.open(query, body)
        waited = max(0.0, time.time() - int(query["timestamp"]))  # the timestamp is checked by the envelope
        message = replace(parse_inbound(opened.plaintext), waited=waited)
        bind_log_context(msgid=message.msgid or None, user=message.userid or None, chat=message.chatid or None)
        kind = f"event:{message.event_type}" if message.msgtype == "event" else message.msgtype
        if self.intake.retired and message.msgtype not in ("stream", "event"):
            raise errors.bot_retired()  # its answers' polls (and their cards' taps) are still answered
        if message.msgtype == "event" and not self._first_time(opened.signature):
            metrics.CALLBACKS.labels(self.bot, kind, "replayed").inc()
            logger.info("repeated event callback: answered without doing it again")
            return self.envelope.seal(self.events.replayed(message), opened.nonce)
        started = time.perf_counter()
        if message.msgtype == "stream":
            try:
                reply = self._poll(message.stream_id, message.waited)
            except StoreUnavailable:
                metrics.CALLBACKS.labels(self.bot, kind, "store_unavailable").inc()
                raise
            metrics.POLL_SECONDS.labels(self.bot).observe(time.perf_counter() - started)
        else:
            reply = self.dispatch(message, self._patience(message, opened.plaintext))
        metrics.CALLBACKS.labels(self.bot, kind, "ok").inc()
        return self.envelope.seal(reply, opened.nonce)

    def _first_time(self, signature: str) -> bool:
        """False for a repeat of a request already handled (a Redis outage counts as first time)."""
        try:
            return self.replays.first_time(signature)
        except REDIS_FAILURES as exc:
            logger.warning("replay check unavailable (%s); handling the event", exc)
            return True

    def _patience(self, message: Inbound, body: str) -> Patience:
        """A new message is taken again through a Redis outage for as long as WeCom waits for the reply
        (CALLBACK_INTAKE_SECONDS), then kept in the database with its bubble open (`body` its JSON)."""
        deadline = time.monotonic() + CALLBACK_INTAKE_SECONDS
        return Patience(
            steady_delays(CALLBACK_INTAKE_SECONDS, CALLBACK_INTAKE_PAUSE),
            give_up=lambda: time.monotonic() >= deadline,
            kept=partial(self._keep, message, body),
        )

    def _keep(self, message: Inbound, body: str) -> dict | None:
        """Keep a new message Redis could not take, under the stream id of the live bubble replied with; None when
        it cannot be kept (no database, or it is away too)."""
        if self.spool is None or not message.msgid:
            return None
        stream_id = self.spool.keep(message.msgid, body, new_stream_id())
        if not stream_id:
            return None
        logger.warning("kept the message in the database: the first poll of its bubble Redis answers takes it")
        return stream_reply(stream_id, self.streams.bubble.live(""), finish=False, feedback_id=stream_id)

    def _poll(self, stream_id: str, waited: float) -> dict:
        """A poll's reply (`waited`: how long WeCom's callback had waited before it was read); for a stream Redis
        does not know, a message kept under its id is taken first.

        Raises:
            StoreUnavailable: Redis (or, for a kept message's bubble, the database) did not answer.
        """
        bind_log_context(stream=stream_id)
        try:
            reply = self.streams.poll_known(stream_id, waited)
            if reply is None and self.spool is not None:
                reply = self._take_kept_by_poll(stream_id, waited)
            return reply if reply is not None else self.streams.unknown(stream_id)
        except REDIS_FAILURES as exc:
            logger.warning("Redis unavailable while answering a poll: %s", exc)
            raise StoreUnavailable from exc
        except SPOOL_FAILURES as exc:
            logger.warning("the database of kept messages unavailable while answering a poll: %s", exc)
            raise StoreUnavailable from exc
        except Exception:
            logger.exception("failed to answer a poll")
            return stream_reply(stream_id, self.dispatch.texts.say("internal_error"), finish=True)

    def _take_kept_by_poll(self, stream_id: str, waited: float) -> dict | None:
        """Take the message kept under this bubble's id, once, on the process whose claim holds; None if none was
        kept and Redis does not know the stream.

        Raises:
            redis.RedisError (or a cluster error): Redis went away again (the row waits for the next poll).
            sqlalchemy.exc.SQLAlchemyError: the database does not answer.
        """
        kept = self.spool.find(stream_id)
        if kept is None:  # none, or just taken by another process, which drops the row once Redis has the stream
            return self.streams.poll_known(stream_id, waited)
        if kept.answered_as:  # its msgid had been taken: this bubble shows that stream
            return _under(self.streams.poll(kept.answered_as, waited=waited), stream_id)
        if not self.streams.has_room() or not self.spool.claim(stream_id):  # another process is taking it
            return stream_reply(stream_id, self.streams.bubble.live(""), finish=False, feedback_id=stream_id)
        message = replace(parse_inbound(kept.body), stream_id=stream_id)
        bind_log_context(msgid=message.msgid or None, user=message.userid or None, chat=message.chatid or None)
        try:
            reply = self.intake.take(message)
        except REDIS_FAILURES:
            self.spool.release(stream_id)
            raise
        answered_as = reply["stream"]["id"]
        self.spool.taken(stream_id, answered_as)
        logger.warning("took a message kept while Redis was away (as stream %s)", answered_as)
        return _under(reply, stream_id)


def _under(reply: dict, stream_id: str) -> dict:
    """A stream reply shown in the bubble of `stream_id` (a kept message's, whose msgid another stream answers)."""
    return {**reply, "stream": {**reply["stream"], "id": stream_id}}


# The bots served at each callback path: a path's bot name and CallbackHandler (bots changed live swap the map).
CallbackPaths = Mapping[str, tuple[str, CallbackHandler]]
