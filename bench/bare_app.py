"""The framework's ceiling: a bare Flask app whose POST handler returns a constant, served with the same
gunicorn settings as the gateway. Poll throughput is reported as a ratio of this app's."""

from __future__ import annotations

from flask import Flask, Response

_BODY = b'{"encrypt":"constant","msgsignature":"0","timestamp":0,"nonce":"0"}'


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/wecom/callback")
    def constant():
        return Response(_BODY, mimetype="application/json")

    @app.get("/readyz")
    def ready():
        return {"status": "ready"}

    return app
