"""Frames WeCom sends to the held connection (`aibot_msg_callback`, `aibot_event_callback`): each becomes a message
of the same dispatch as in callback mode (services/chat/dispatch.py: a stream, the same Redis keys, a worker calling
the backend, on any replica), answered on the frame's req_id, which the message carries (its stream is tracked for
the outbox from its creation, services/streams/service.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import orjson

from services.chat.dispatch import Dispatch, Patience
from services.longconn import frames
from services.longconn.lease import Holding
from services.longconn.outbox import Outbox
from services.longconn.replies import ReplyPump
from services.longconn.session import Session
from services.longconn.spool import KeptWhileTaken, Spool
from services.outage import delays_for
from services.streams.record import ACTIVE_STATUSES, F
from services.wecom.errors import CallbackError
from services.wecom.messages import Inbound, parse_inbound
from utils.logging import log_context

logger = logging.getLogger(__name__)

# How long a message read from the connection is taken again while Redis does not answer: WeCom delivers it once on
# a long connection (a callback is tried again by WeCom instead), so one met by a Redis restart or failover (their
# overlays budget 30 s) is answered when Redis is back, not ended with "please ask again". A connection lost
# meanwhile costs nothing: the stream keeps its route, and the next holder sends the answer (outbox.py).
INTAKE_PATIENCE_SECONDS = 30.0


class InboundHandler:
    """Answers the frames WeCom sends on this process's connection."""

    def __init__(
        self,
        dispatch: Dispatch,
        replies: ReplyPump,
        connection: Callable[[], tuple[Session | None, Holding | None]],
        spool: Spool | None = None,
        outbox: Outbox | None = None,
    ):
        self.dispatch = dispatch
        self.streams = dispatch.streams
        self.replies = replies
        self._connection = connection  # the session and holding this process has now
        self.spool = spool  # where a message read while Redis is away is kept (None: no database)
        self.outbox = outbox

    def __call__(self, data: dict) -> None:
        req_id = frames.req_id_of(data)
        body = data.get("body")
        if not isinstance(body, dict) or not req_id:
            return
        try:
            message = parse_inbound(orjson.dumps(body).decode())
        except CallbackError as exc:
            logger.warning("ignored a malformed %s frame: %s", data.get("cmd"), exc.error)
            return
        session, holding = self._connection()
        if holding is not None:  # the answer's route, which the stream keeps from its creation (StreamService.open)
            message = replace(message, ws_req_id=req_id, ws_generation=holding.generation)
        # a user's message, kept where another process finds it, should this one die, once its intake is slow or
        # meets Redis away (an event is not: a drain answers a message, and a card's click can be made again)
        kept = None
        if self.spool is not None and message.msgid and message.msgtype != "event":
            kept = KeptWhileTaken(self.spool, message.msgid, orjson.dumps(body).decode())
        with log_context(msgid=message.msgid or None, user=message.userid or None, chat=message.chatid or None):
            patience = Patience(delays_for(INTAKE_PATIENCE_SECONDS), on_first_failure=kept.keep if kept else None)
            reply = self.dispatch(message, patience)
            if kept is not None:  # (an intake that raised leaves its row, if any, to a drain)
                kept.done()
        if reply is None:
            return
        if message.msgtype == "event":
            command = frames.RESPOND_UPDATE if message.event_type == "template_card_event" else frames.RESPOND_WELCOME
            if session is not None:
                session.send(frames.frame(command, req_id, reply), req_id)
            return
        self.replies.open(req_id, (reply.get("stream") or {}).get("id", ""), reply)

    def _follow_if_nobody_does(self, stream_id: str, message: Inbound) -> None:
        """The msgid's stream stands, but may have been left by a try that died before it queued and followed it:
        its first try claimed the msgid and met Redis failing, its tries again found the message taken, and the
        process died before it followed the stream (a one-server run of seed 55: no answer, no note). A stream
        still unended that the outbox does not follow is answered by nobody: followed now as a message of its own,
        its frame being gone (a poll of the outbox takes it over once its opener's lease is gone)."""
        meta = self.streams.store.reads.meta(stream_id)
        if not meta or meta.get(F.status) not in ACTIVE_STATUSES or self.outbox.tracked(stream_id):
            return
        logger.warning("a kept message's stream %s was never queued; the outbox answers it", stream_id)
        self.outbox.track_separate(stream_id, message.chatid or message.userid, not message.chatid)

    def take_kept(self, body: str) -> str:
        """Take a message another process read while Redis was away and kept (services/longconn/spool.py), that
        process being gone: answered as a message of its own, since the frame it came on is gone too. Returns what
        became of it: `already` (its msgid was taken: that answer stands), `answered` (an answer runs, which the
        outbox sends whole when it ends), `replied` (a finished reply, a refusal or a command's, sent as a message),
        or `malformed`.

        Raises:
            redis.RedisError (or a cluster error): Redis is still away.
        """
        try:
            message = parse_inbound(body)
        except CallbackError as exc:
            logger.warning("dropped a kept message that does not parse: %s", exc.error)
            return "malformed"
        with log_context(msgid=message.msgid or None, user=message.userid or None, chat=message.chatid or None):
            if taken := self.streams.store.reads.stream_for_msgid(message.msgid):
                self._follow_if_nobody_does(taken, message)
                return "already"
            reply = self.dispatch.intake.take(message)
            stream = (reply or {}).get("stream") or {}
            if not stream.get("finish"):
                return "answered"
            message_id = f"kept.{message.msgid}"
            if self.outbox.posted(message_id):  # by a drain that died after posting it, before dropping the row
                return "replied"
            chat, single = message.chatid or message.userid, not message.chatid
            fields = {"msgid": f"kept:{message.msgid}", "userid": message.userid, "chatid": message.chatid}
            self.outbox.post(
                message_id,
                self.streams.owner,
                stream.get("content", ""),
                chat,
                single,
                {**fields, "aibotid": message.aibotid},
            )
            return "replied"
