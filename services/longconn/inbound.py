"""Frames WeCom sends to the held connection (`aibot_msg_callback`, `aibot_event_callback`): each becomes a message
of the same intake as in callback mode (a stream, the same Redis keys, a worker calling Dify, on any replica),
answered on the frame's req_id; a stream answered so is tracked for the outbox."""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson

from services.callback.handler import CallbackHandler
from services.longconn import frames
from services.longconn.lease import Holding
from services.longconn.outbox import Outbox
from services.longconn.replies import ReplyPump
from services.longconn.session import Session
from services.redis_conn import REDIS_FAILURES
from services.wecom.errors import CallbackError
from services.wecom.messages import parse_inbound
from utils.logging import log_context

logger = logging.getLogger(__name__)


class InboundHandler:
    """Answers the frames WeCom sends on this process's connection."""

    def __init__(
        self,
        callback: CallbackHandler,
        replies: ReplyPump,
        outbox: Outbox,
        connection: Callable[[], tuple[Session | None, Holding | None]],
    ):
        self.callback = callback
        self.replies = replies
        self.outbox = outbox
        self._connection = connection  # the session and holding this process has now

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
        with log_context(msgid=message.msgid or None, user=message.userid or None, chat=message.chatid or None):
            reply = self.callback.dispatch(message)
        if reply is None:
            return
        session, holding = self._connection()
        if message.msgtype == "event":
            command = frames.RESPOND_UPDATE if message.event_type == "template_card_event" else frames.RESPOND_WELCOME
            if session is not None:
                session.send(frames.frame(command, req_id, reply), req_id)
            return
        stream = reply.get("stream") or {}
        stream_id = stream.get("id", "")
        if holding is not None and not stream.get("finish"):
            try:
                self.outbox.track(
                    stream_id, req_id, holding.generation, message.chatid or message.userid, not message.chatid
                )
            except REDIS_FAILURES as exc:
                logger.warning("could not track the stream for its delivery: %s", exc)
        self.replies.open(req_id, stream_id, reply)
