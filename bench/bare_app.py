"""Reference apps for the poll benchmark, served with the same gunicorn settings as the gateway.

* `create_app()`, the framework's ceiling: a bare Flask app whose POST handler returns a constant. Poll
  throughput is reported as a ratio of this app's.
* `create_route_app()`, the ceiling of the route the gateway answers callbacks on (web/callback_route.py, in
  front of Flask): that route answering a constant. The gateway's ratio to bare Flask is the target's; its ratio
  to this app says how much of the route's own speed its work leaves.
* `create_floor_app()`, the floor of any poll: the request's body and query read, one Redis round trip (a trivial
  Lua script, on the cheapest connection path this project has), then a constant. A poll cannot do less: it must
  read the stream's state from Redis. The distance from this app to the ceiling is one round trip, and the route.
* `create_protocol_floor_app()`, the floor plus what WeCom's protocol forces on every poll: check the signature,
  decrypt, and encrypt and sign a (constant) reply. The gateway's distance from this app is what its own work
  costs (the real poll script, the bubble, metrics, logging context, checks).

The route and both floors answer their POSTs on the gateway's own callback route, so they differ from the gateway
only in the handler behind it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from types import SimpleNamespace

import orjson
from flask import Flask, Response

from services.redis_conn import HotPathConnections, connect_redis
from services.wecom.crypto import WeComCrypto
from web.callback_route import CallbackRoute

_BODY = b'{"encrypt":"constant","msgsignature":"0","timestamp":0,"nonce":"0"}'


def create_app() -> Flask:
    app = _flask()

    @app.post("/wecom/callback")
    def constant():
        return Response(_BODY, mimetype="application/json")

    return app


def create_route_app() -> Flask:
    """The callback route answering a constant."""
    constant = orjson.loads(_BODY)
    return _on_the_callback_route(lambda query, body: constant)


def create_floor_app() -> Flask:
    """Needs REDIS_URL."""
    round_trip = _trivial_round_trip()
    constant = orjson.loads(_BODY)

    def one_round_trip(query: Mapping[str, str], body: bytes) -> dict:
        round_trip(query.get("msg_signature", ""))
        return constant

    return _on_the_callback_route(one_round_trip)


def create_protocol_floor_app() -> Flask:
    """Needs REDIS_URL, WECOM_TOKEN and WECOM_ENCODING_AES_KEY. What the protocol forces on any poll, and no more:
    check the signature and decrypt the callback, one Redis round trip (the trivial script), then encrypt and sign
    a constant stream reply."""
    round_trip = _trivial_round_trip()
    crypto = WeComCrypto(os.environ["WECOM_TOKEN"], os.environ["WECOM_ENCODING_AES_KEY"])
    reply = orjson.dumps({"msgtype": "stream", "stream": {"id": "x", "finish": False, "content": "constant"}}).decode()

    def protocol_only(query: Mapping[str, str], body: bytes) -> dict:
        encrypted = orjson.loads(body)["encrypt"]
        crypto.open_envelope(query["msg_signature"], query["timestamp"], query["nonce"], encrypted)
        round_trip(query["msg_signature"])
        return crypto.seal_reply(reply, query["nonce"], int(time.time()))

    return _on_the_callback_route(protocol_only)


def _on_the_callback_route(handle: Callable[[Mapping[str, str], bytes], dict]) -> Flask:
    """A Flask app whose POST /wecom/callback is answered by `handle(query, body)` on the gateway's callback route."""
    app = _flask()
    paths = {"/wecom/callback": ("floor", SimpleNamespace(handle=handle))}
    app.wsgi_app = CallbackRoute(app.wsgi_app, lambda: paths, "floor", 256 * 1024)
    return app


def _flask() -> Flask:
    """A Flask app with the /readyz the benchmark harness waits for."""
    app = Flask(__name__)

    @app.get("/readyz")
    def ready():
        return {"status": "ready"}

    return app


def _trivial_round_trip():
    """One Redis round trip (a script that echoes its argument) on the gateway's poll connection path."""
    client = connect_redis(os.environ["REDIS_URL"])
    connections = HotPathConnections(client)
    echo = client.script_load("return ARGV[1]")
    return lambda value: connections.execute("EVALSHA", echo, 0, value)
