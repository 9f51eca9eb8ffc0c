"""The local console (demo mode only): a chat page that plays WeCom against the real callback endpoint.

The browser does WeCom's part itself, with WebCrypto: it encrypts and signs each callback, posts it to the
callback URL, checks and decrypts the reply, and polls about once a second, rendering the cumulative markdown.
This blueprint only serves the page, the demo credentials, the Redis keys of a stream for the side panel, and a
stand-in for WeCom's response_url (so "the rest follows" messages show up in the chat too).
"""

from __future__ import annotations

import secrets
import threading
from collections import defaultdict

from flask import Blueprint, current_app, jsonify, render_template, request

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
    """What the page needs to play WeCom: the demo Token and EncodingAESKey, and where to post."""
    settings = _gateway().settings
    return jsonify(
        token=settings.wecom_token,
        encoding_aes_key=settings.wecom_encoding_aes_key,
        callback_path=settings.wecom_callback_path,
        aibotid="demo-bot",
    )


@console.get("/api/stream/<stream_id>")
def stream(stream_id: str):
    """The stream's Redis keys and fields, for the side panel."""
    info = StreamInspector(_gateway().redis, _gateway().keys).describe(stream_id)
    if info is None:
        return jsonify(error="not_found", message="no such stream (unknown or expired)"), 404
    info.pop("chunks")
    return jsonify(info)


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
