"""The local console (demo mode only): a chat page that plays WeCom against the real callback endpoint.

The browser does WeCom's part itself, with WebCrypto: it encrypts and signs each callback, posts it to the
callback URL, checks and decrypts the reply, and polls about once a second, rendering the cumulative markdown.
This blueprint only serves the page, the demo credentials, the Redis keys of a stream for the side panel, and a
stand-in for WeCom's response_url (so "the rest follows" messages show up in the chat too). Template cards are
drawn with their buttons, selectors and questions; a tap goes back as WeCom sends it (a `template_card_event`). A
long-connection bot has no callback URL: the page hands its messages (and taps) to the WeCom WebSocket stand-in the
demo started, and reads back the frames the bot sent on each req_id. What a bot's group robot says in its group (a
push, a schedule's report) is shown as the group's message.
"""

from __future__ import annotations

import secrets
import threading
from collections import defaultdict

from flask import Blueprint, current_app, jsonify, render_template, request
from sqlalchemy.exc import SQLAlchemyError

from services.audit.export import plain_row
from services.audit.rows import MESSAGE
from services.chat.quotas import CHAT, USER, Quotas
from services.redis_conn import REDIS_FAILURES
from services.streams.inspector import StreamInspector

console = Blueprint("console", __name__, url_prefix="/console", static_folder="static", template_folder="templates")

_responses: dict[str, list[dict]] = defaultdict(list)
_responses_lock = threading.Lock()
_MAX_CODES = 500


def _gateway():
    return current_app.extensions["gateway"]


@console.get("")
def page():
    return render_template("console.html")


@console.get("/api/config")
def config():
    """What the page needs to play WeCom for each bot: its demo Token and EncodingAESKey, and where to post."""
    bots = [
        {
            "name": bot.name,
            "display_name": bot.settings.wecom.name or bot.name,  # as WeCom names the bot in a chat
            "mode": bot.settings.wecom.mode,
            "token": bot.settings.wecom.token,
            "encoding_aes_key": bot.settings.wecom.encoding_aes_key,
            "callback_path": bot.settings.wecom.callback_path if bot.delivery.mode == "callback" else "WebSocket",
            "aibotid": "demo-bot" if len(_gateway().bots) == 1 else f"demo-{bot.name}",
        }
        for bot in _gateway().bots.values()
    ]
    return jsonify(bots=bots)


def _websocket(bot_name: str):
    """(the long-connection bot's settings, the WebSocket stand-in playing WeCom for it), or a 404 reply."""
    from demo.app import websocket_standin  # the demo app imports this blueprint

    bot = _gateway().bots.get(bot_name)
    connected = bot is not None and bot.delivery.mode == "long_connection"
    standin = websocket_standin(bot.settings.connection.ws_url) if connected else None
    if standin is None:
        return None, (jsonify(error="not_found", message="no long-connection bot of that name here"), 404)
    return (bot.settings, standin), None


@console.post("/api/ws/<bot_name>/message")
def ws_message(bot_name: str):
    """Deliver a text (or `enter_chat`) over the long connection, as WeCom would; returns the callback's req_id."""
    found, failure = _websocket(bot_name)
    if failure:
        return failure
    settings, standin = found
    body = request.get_json(silent=True) or {}
    try:
        if body.get("event") == "enter_chat":
            req_id = standin.deliver_event(settings.connection.bot_id, "enter_chat", body.get("userid") or "alice")
        else:
            req_id = standin.deliver_text(
                settings.connection.bot_id, str(body.get("text") or ""), body.get("userid") or "alice"
            )
    except RuntimeError:
        return jsonify(error="not_connected", message="the bot has not connected yet; try again in a moment"), 409
    return jsonify(req_id=req_id)


@console.get("/api/ws/<bot_name>/frames/<req_id>")
def ws_frames(bot_name: str, req_id: str):
    """The frames the bot sent on a req_id (stream frames, or the welcome), and what it sent proactively."""
    found, failure = _websocket(bot_name)
    if failure:
        return failure
    _, standin = found
    delivery = standin.deliveries.get(req_id)
    return jsonify(
        frames=standin.frames(req_id),
        welcome=standin.welcome(req_id),
        update=delivery.update if delivery is not None else None,
        proactive=standin.proactive,
    )


@console.post("/api/ws/<bot_name>/click")
def ws_click(bot_name: str):
    """Send a tap on a card (its template_card_event, built by the page) down the long connection."""
    return _event_over_websocket(bot_name, "template_card_event", "event")


@console.post("/api/ws/<bot_name>/feedback")
def ws_feedback(bot_name: str):
    """A 👍/👎 on an answer (its feedback_event, built by the page) down the long connection."""
    return _event_over_websocket(bot_name, "feedback_event", "feedback")


def _event_over_websocket(bot_name: str, eventtype: str, field: str):
    """Deliver the event the page built (the request's `field`) as WeCom's aibot_event_callback; its req_id."""
    found, failure = _websocket(bot_name)
    if failure:
        return failure
    settings, standin = found
    body = request.get_json(silent=True) or {}
    payload = body.get(field) if isinstance(body.get(field), dict) else {}
    try:
        req_id = standin.deliver_event(settings.connection.bot_id, eventtype, body.get("userid") or "alice", payload)
    except RuntimeError:
        return jsonify(error="not_connected", message="the bot is not connected"), 409
    return jsonify(req_id=req_id)


@console.get("/api/robots")
def robots():
    """What the bots' group robots said in their groups (the demo's stand-in of WeCom's webhook took it): a push,
    a schedule's report. Each with the robot's name as its bot's table names it."""
    from config.settings import webhook_key
    from demo.app import robot_messages  # the demo app imports this blueprint

    names = {
        webhook_key(url): f"{bot.name} · {name}"
        for bot in _gateway().bots.values()
        for name, url in bot.settings.wecom.webhook_urls().items()
    }
    said = [{"robot": names.get(m["key"], "robot"), "body": m["body"], "at": m["at"]} for m in robot_messages()]
    return jsonify(messages=said)


@console.get("/api/stream/<stream_id>")
def stream(stream_id: str):
    """The stream's Redis keys and fields, for the side panel."""
    bots = _gateway().bots
    bot = bots.get(request.args.get("bot", "")) or next(iter(bots.values()))
    info = StreamInspector(_gateway().redis, bot.keys).describe(stream_id)
    if info is None:
        return jsonify(error="not_found", message="no such stream (unknown or expired)"), 404
    info.pop("chunks")
    info["audit_row"] = _audit_row(bot.name, info)
    info["quota"] = _quota(bot.quotas, info["meta"])
    return jsonify(info)


def _quota(quotas: Quotas | None, meta: dict) -> dict | str:
    """What the message's user (and group chat) asked today against the bot's daily quotas."""
    if quotas is None:
        return "no daily quota (QUOTA_USER_MESSAGES_PER_DAY, QUOTA_CHAT_MESSAGES_PER_DAY)"
    try:
        return {
            scope: f"{who}: {quotas.used(scope, who)} of {quotas.limits[scope]} today"
            for scope, who in ((USER, meta.get("userid", "")), (CHAT, meta.get("chatid", "")))
            if quotas.limits[scope] and who
        }
    except REDIS_FAILURES as exc:
        return f"Redis did not answer ({type(exc).__name__})"


def _audit_row(bot: str, info: dict) -> dict | str:
    """The message's row of the audit trail (docs/audit.md), as it stands beside the stream's keys."""
    records = _gateway().audit_records
    if records is None:
        return "the audit trail is off (AUDIT=off)"
    msgid = info["meta"].get("msgid", "")
    try:
        row = records.row(bot, msgid, MESSAGE) if msgid else None
    except SQLAlchemyError as exc:
        return f"the database did not answer ({type(exc).__name__})"
    return plain_row(row) if row is not None else "not written yet: a sweep writes it within a second of the end"


@console.post("/api/response-url")
def new_response_url():
    """A fresh response_url for a message, pointing back at this console."""
    code = secrets.token_hex(8)
    return jsonify(url=f"{request.host_url.rstrip('/')}/console/api/response/{code}", code=code)


@console.post("/api/response/<code>")
def receive(code: str):
    """WeCom's response_url, played locally: keep the message for the page (once per code, like WeCom)."""
    with _responses_lock:
        used = code in _responses
        _responses[code].append(request.get_json(silent=True) or {})
        while len(_responses) > _MAX_CODES:
            _responses.pop(next(iter(_responses)))
    if used:
        return jsonify(errcode=600001, errmsg="response_code already used")
    return jsonify(errcode=0, errmsg="ok")


@console.get("/api/response/<code>")
def received(code: str):
    with _responses_lock:
        return jsonify(messages=list(_responses.get(code, [])))
