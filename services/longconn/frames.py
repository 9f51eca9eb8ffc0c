"""The frames of WeCom's long-connection protocol (docs/protocol.md): `{cmd, headers: {req_id}, body}`
out, the same or an ack `{headers: {req_id}, errcode, errmsg}` in."""

from __future__ import annotations

import secrets
import time

import orjson

SUBSCRIBE = "aibot_subscribe"
PING = "ping"
EVENT_CALLBACK = "aibot_event_callback"
RESPOND = "aibot_respond_msg"
RESPOND_WELCOME = "aibot_respond_welcome_msg"
RESPOND_UPDATE = "aibot_respond_update_msg"  # a template_card_event's answer: the card updated
SEND = "aibot_send_msg"
UPLOAD_INIT, UPLOAD_CHUNK, UPLOAD_FINISH = (
    "aibot_upload_media_init",
    "aibot_upload_media_chunk",
    "aibot_upload_media_finish",
)

BAD_CREDENTIALS = 853000  # wrong bot_id or secret (the server leaves the socket open)
DEAD_REQ_ID = 846605  # a req_id of another (or an earlier) connection
NOT_SUBSCRIBED = 846609  # WeCom no longer counts the socket as the bot's subscription: subscribe again
STREAM_EXPIRED = 846608  # the stream's window is over


def new_req_id(cmd: str) -> str:
    """A unique request id of ours, shaped like the official SDK's."""
    return f"{cmd}_{int(time.time() * 1000)}_{secrets.token_hex(4)}"


def frame(cmd: str, req_id: str, body: dict | None = None) -> str:
    payload: dict = {"cmd": cmd, "headers": {"req_id": req_id}}
    if body is not None:
        payload["body"] = body
    return orjson.dumps(payload).decode()


def subscribe(bot_id: str, secret: str) -> tuple[str, str]:
    req_id = new_req_id(SUBSCRIBE)
    return req_id, frame(SUBSCRIBE, req_id, {"bot_id": bot_id, "secret": secret})


def ping() -> tuple[str, str]:
    req_id = new_req_id(PING)
    return req_id, frame(PING, req_id)


def send_markdown(chatid: str, single: bool, content: str) -> tuple[str, str]:
    """A proactive markdown message (the rest of an answer whose stream cannot be updated any more)."""
    req_id = new_req_id(SEND)
    body = {"chatid": chatid, "chat_type": 1 if single else 2, "msgtype": "markdown", "markdown": {"content": content}}
    return req_id, frame(SEND, req_id, body)


def parse(text: str) -> dict | None:
    """A received frame as a dict (None for anything else)."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def req_id_of(data: dict) -> str:
    headers = data.get("headers")
    return str(headers.get("req_id") or "") if isinstance(headers, dict) else ""
