"""Frames WeCom sends to the held connection (`aibot_msg_callback`, `aibot_event_callback`): each becomes a message
of the same intake as in callback mode (a stream, the same Redis keys, a worker calling Dify, on any replica),
answered on the frame's req_id, which the message carries (its stream is tracked for the outbox from its creation,
services/streams/service.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import orjson

from services.callback.handler import CallbackHandler
from services.longconn import frames
from services.longconn.lease import Holding
from services.longconn.replies import ReplyPump
from services.longconn.session import Session
from services.wecom.errors import CallbackError
from services.wecom.messages import parse_inbound
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
        callback: CallbackHandler,
        replies: ReplyPump,
        connection: Callable[[], tuple[Session | None, Holding | None]],
    ):
        self.callback = callback
        self.replies = replies
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
        session, holding = self._connection()
        if holding is not None:  # the answer's route, which the stream keeps from its creation (StreamService.open)
            message = replace(message, ws_req_id=req_id, ws_generation=holding.generation)
        with log_context(msgid=message.msgid or None, user=message.userid or None, chat=message.chatid or None):
            reply = self.callback.dispatch(message, patience=INTAKE_PATIENCE_SECONDS)
        if reply is None:
            return
        if message.msgtype == "event":
            command = frames.RESPOND_UPDATE if message.event_type == "template_card_event" else frames.RESPOND_WELCOME
            if session is not None:
                session.send(frames.frame(command, req_id, reply), req_id)
            return
        self.replies.open(req_id, (reply.get("stream") or {}).get("id", ""), reply)
