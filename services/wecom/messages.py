"""Decrypted callback JSON -> a typed `Inbound` message, and the reply bodies WeCom accepts (before encryption).

Parsing is strict about what we rely on (types, ids that become Redis keys) and lenient about the rest, so a
future field never breaks us while a malformed or hostile payload is refused with a 4xx.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import orjson

from services.wecom import errors

MESSAGE_TYPES = frozenset({"text", "image", "mixed", "voice", "file", "video"})
KNOWN_TYPES = MESSAGE_TYPES | {"stream", "event"}
# A well-formed message of a type the gateway does not know (a location, a link card, one WeCom adds later): it gets
# a finished bubble saying so, never an HTTP error WeCom would retry. Its own msgtype is not kept (a metric label).
UNSUPPORTED = "unsupported"
# Stream ids are ours (see new_stream_id); anything else cannot be one of our streams and must not reach a key.
STREAM_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_ID_LENGTH = 256


@dataclass(frozen=True, slots=True)
class Inbound:
    """One decrypted callback. Text-bearing types fill `text`; a poll fills `stream_id`; an event `event_type`. A new
    message kept while Redis was away carries the `stream_id` of the bubble it was answered with, under which it is
    taken (services/callback/spool.py)."""

    msgtype: str
    msgid: str = ""
    aibotid: str = ""
    chattype: str = "single"
    chatid: str = ""
    userid: str = ""
    response_url: str = ""
    text: str = ""
    image_urls: tuple[str, ...] = ()
    file_url: str = ""
    media_keys: dict[str, str] = field(default_factory=dict)  # long-connection mode: media url -> its own aeskey
    # long-connection mode: the frame's req_id and the generation of the connection it came on (the answer's route)
    ws_req_id: str = ""
    ws_generation: int = 0
    stream_id: str = ""
    # callback mode: how long the callback had waited before it was read (its signed timestamp on; a frozen process,
    # a queue): a reply later than WeCom waits for is not a poll WeCom saw, and must not carry a card
    waited: float = 0.0
    quote: dict | None = None
    event_type: str = ""
    event: dict = field(default_factory=dict)

    @property
    def is_group(self) -> bool:
        return self.chattype == "group"


def parse_inbound(plaintext: str) -> Inbound:
    """Parse decrypted callback JSON.

    An unknown msgtype parses to an UNSUPPORTED message.

    Raises:
        CallbackError: invalid_message for a malformed payload.
    """
    try:
        data = orjson.loads(plaintext)
    except orjson.JSONDecodeError:
        raise errors.invalid_message("decrypted payload is not JSON") from None
    if not isinstance(data, dict):
        raise errors.invalid_message("decrypted payload is not a JSON object")
    msgtype = data.get("msgtype")
    if not isinstance(msgtype, str) or not msgtype:
        raise errors.invalid_message("msgtype is missing")
    if msgtype not in KNOWN_TYPES:
        msgtype = UNSUPPORTED

    sender = data.get("from") if isinstance(data.get("from"), dict) else {}
    common = {
        "msgtype": msgtype,
        "msgid": _short_id(data.get("msgid"), "msgid", required=msgtype in MESSAGE_TYPES),
        "aibotid": _short_id(data.get("aibotid"), "aibotid"),
        "chattype": "group" if data.get("chattype") == "group" else "single",
        "chatid": _short_id(data.get("chatid"), "chatid"),
        "userid": _short_id(sender.get("userid"), "from.userid", required=msgtype != "stream"),
        "response_url": _string(data.get("response_url")),
    }

    if msgtype == "stream":
        stream = data.get("stream") if isinstance(data.get("stream"), dict) else {}
        stream_id = stream.get("id")
        if not isinstance(stream_id, str) or not STREAM_ID_PATTERN.fullmatch(stream_id):
            raise errors.invalid_message("stream.id is missing or malformed")
        return Inbound(stream_id=stream_id, **common)
    if msgtype == UNSUPPORTED:
        return Inbound(**common)
    if msgtype == "event":
        event = data.get("event") if isinstance(data.get("event"), dict) else {}
        event_type = event.get("eventtype")
        if not isinstance(event_type, str) or not event_type:
            raise errors.invalid_message("event.eventtype is missing")
        payload = event.get(event_type)
        return Inbound(event_type=event_type, event=payload if isinstance(payload, dict) else {}, **common)

    body = data.get(msgtype) if isinstance(data.get(msgtype), dict) else None
    if body is None:
        raise errors.invalid_message(f"'{msgtype}' body is missing")
    text, images, file_url = _content_of(msgtype, body)
    quote = data.get("quote") if isinstance(data.get("quote"), dict) else None
    keys = media_keys(data) | (media_keys(quote) if quote else {})
    return Inbound(text=text, image_urls=images, file_url=file_url, quote=quote, media_keys=keys, **common)


def _content_of(msgtype: str, body: dict) -> tuple[str, tuple[str, ...], str]:
    """(text, image urls, file url) of a message body of the given type."""
    if msgtype in ("text", "voice"):
        return _string(body.get("content")), (), ""
    if msgtype == "image":
        return "", tuple(u for u in [_string(body.get("url"))] if u), ""
    if msgtype in ("file", "video"):
        return "", (), _string(body.get("url"))
    texts, images = [], []
    items = body.get("msg_item") if isinstance(body.get("msg_item"), list) else []
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("msgtype")
        inner = item.get(kind) if isinstance(item.get(kind), dict) else {}
        if kind == "text" and _string(inner.get("content")):
            texts.append(_string(inner.get("content")))
        elif kind == "image" and _string(inner.get("url")):
            images.append(_string(inner.get("url")))
    return "\n".join(texts), tuple(images), ""


def media_keys(message: dict) -> dict[str, str]:
    """url -> aeskey of every medium a message (or a quote) carries its own key for (long-connection mode)."""
    found: dict[str, str] = {}

    def take(item) -> None:
        if isinstance(item, dict) and isinstance(item.get("url"), str) and isinstance(item.get("aeskey"), str):
            found[item["url"]] = item["aeskey"]

    for kind in ("image", "file", "video"):
        take(message.get(kind))
    mixed = message.get("mixed") if isinstance(message.get("mixed"), dict) else {}
    for item in mixed.get("msg_item") or []:
        if isinstance(item, dict):
            take(item.get("image"))
    return found


def _string(value) -> str:
    return value if isinstance(value, str) else ""


def _short_id(value, name: str, required: bool = False) -> str:
    if value is None or value == "":
        if required:
            raise errors.invalid_message(f"{name} is missing")
        return ""
    if not isinstance(value, str) or len(value) > _MAX_ID_LENGTH or not value.isprintable():
        raise errors.invalid_message(f"{name} is malformed")
    return value


# --- replies (plaintext JSON; the callback layer encrypts them) ---------------------------------------------------


def stream_reply(
    stream_id: str,
    content: str,
    finish: bool,
    *,
    feedback_id: str = "",
    images: list[dict] | None = None,
    card: dict | None = None,
) -> dict:
    """A `stream` reply: the full text so far (WeCom replaces the bubble), finish=True ends the polls. With a
    template `card`, a `stream_with_template_card` reply (WeCom takes one card per message)."""
    stream: dict = {"id": stream_id, "finish": finish, "content": content}
    if images and finish:
        stream["msg_item"] = images
    if feedback_id:
        stream["feedback"] = {"id": feedback_id}
    if card:
        return {"msgtype": "stream_with_template_card", "stream": stream, "template_card": card}
    return {"msgtype": "stream", "stream": stream}


def text_reply(content: str) -> dict:
    """A `text` reply, allowed only for the enter_chat event."""
    return {"msgtype": "text", "text": {"content": content}}
