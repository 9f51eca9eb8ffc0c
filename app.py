"""The Flask app: `create_app(settings=None)` and thin routes over the gateway services.

Run locally with `.venv/bin/python app.py` (development server); in production with
`gunicorn -c gunicorn.conf.py 'app:create_app()'`. Those two serve, so they start the gateway's background work
(`Gateway.start()`: the audit sweep, each bot's delivery watch, each long-connection bot's answer consumer and
connection holder, and the BOTS_FILE watch); building the app, as every `flask --app app` command does, starts
none, and a command prints only its own output (logs at WARNING and above).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import click
import orjson
from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from cli import register_commands
from config.bots import RUN_DIR_VARIABLE, load_bots, load_bots_keeping_last_good, shared_dify_keys
from config.settings import ENV_FILES, BotSettings, Settings, SettingsError, load_settings
from services import metrics
from services.embedded_store import EmbeddedStoreUnavailable
from services.files.links import FILE_PATH
from services.gateway import Gateway, build_gateway
from services.wecom import errors
from utils.logging import log_context, setup_logging
from web.admin import install as install_admin
from web.callback_route import INTERNAL_ERROR, CallbackRoute, rejected

logger = logging.getLogger("app")


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app for `settings` (default: read from the environment) and its bots (BOTS_FILE, or the one the
    settings define); a bad value exits with one line per problem."""
    if settings is None:
        settings = load_settings_or_exit()
    bots, kept, run_dir = load_bots_or_exit(settings)
    serves = not running_a_command()
    setup_logging(
        settings.log_level if serves else quieter(settings.log_level),
        settings.log_format or "text",
        settings.instance_id,
        secrets=settings.secrets() + [secret for bot in bots for secret in bot.secrets()],
    )
    for problem in kept:
        logger.error("configuration error: %s; the bots of BOTS_FILE's last good copy are served", problem)
    for warning in shared_dify_keys(bots):
        logger.warning("%s", warning)
    if serves and settings.demo_mode:
        logger.warning("DEMO MODE: built-in stand-ins and demo credentials; never use this in production")
    if serves and not settings.files.public_base_url:
        logger.warning("PUBLIC_BASE_URL is not set: files Dify makes are named in answers, not linked")

    app = Flask(__name__, instance_relative_config=True)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    try:
        gateway = build_gateway(settings, bots, Path(app.instance_path), run_dir)
    except EmbeddedStoreUnavailable as exc:
        exit_with_problems([str(exc)])
    app.extensions["gateway"] = gateway

    # Each callback-mode bot at its own path (another bot's signature fails there: invalid_signature), answered in
    # front of Flask: WeCom's polls are most of the traffic, and the paths change with BOTS_FILE (Gateway.apply).
    app.wsgi_app = CallbackRoute(app.wsgi_app, lambda: gateway.paths, gateway.owner, settings.max_body_bytes)
    app.add_url_rule(FILE_PATH + "<token>", "file_link", file_link)
    if gateway.push is not None:  # without PUSH_API_TOKEN there is no push API: /api/push answers 404
        app.add_url_rule("/api/push", "push", push, methods=["POST"])
        app.add_url_rule("/api/push/<push_id>", "push_status", push_status, methods=["GET"])
    if gateway.audit_api is not None:  # without AUDIT_API_TOKEN (or with AUDIT off) /api/audit answers 404
        app.add_url_rule("/api/audit", "audit", audit_rows, methods=["GET"])
    if settings.admin_token:  # without ADMIN_TOKEN there is no operator's page: /admin answers 404
        install_admin(app, gateway)
    app.add_url_rule("/healthz", "healthz", healthz)
    app.add_url_rule("/readyz", "readyz", readyz)
    if not settings.metrics_port:  # else served on METRICS_PORT only, out of the public port's reach
        app.add_url_rule("/metrics", "metrics", metrics_endpoint)
    _register_error_handlers(app)
    register_commands(app)
    served = ", ".join(
        f"{bot.name} over WebSocket" if bot.long_connection else f"{bot.name} at {bot.wecom.callback_path}"
        for bot in bots
    )
    logger.info("gateway ready: %s; instance %s", served, settings.instance_id)
    return app


def running_a_command() -> bool:
    """Whether the app is built for an operator command (`flask --app app <group> <command>`: Flask's CLI loads it
    inside its click context), which prints only its own output, rather than to serve (gunicorn, `python app.py`,
    the demo)."""
    return click.get_current_context(silent=True) is not None


def quieter(level: str) -> str:
    """An operator command's log level: WARNING, or the configured one if that is higher."""
    configured = logging.getLevelName(level.upper())
    return level if isinstance(configured, int) and configured > logging.WARNING else "WARNING"


def load_settings_or_exit(env_files=ENV_FILES) -> Settings:
    """Settings from the environment and `env_files` (production: `.env` only), or one clear line per problem on
    stderr and exit status 2."""
    try:
        return load_settings(env_files=env_files)
    except SettingsError as exc:
        exit_with_problems(exc.problems)


def load_bots_or_exit(settings: Settings) -> tuple[tuple[BotSettings, ...], list[str], Path | None]:
    """The bots of the deployment (config/bots.py), or one clear line per problem and exit status 2. Under
    gunicorn, a bad BOTS_FILE gives its last good copy's bots and the file's problems (to be logged); and the
    folder of that copy (None outside gunicorn)."""
    run_dir = Path(os.environ[RUN_DIR_VARIABLE]) if os.environ.get(RUN_DIR_VARIABLE) else None
    try:
        if run_dir is not None:
            return *load_bots_keeping_last_good(settings, run_dir), run_dir
        return load_bots(settings), [], None
    except SettingsError as exc:
        exit_with_problems(exc.problems)


def exit_with_problems(problems: list[str]) -> NoReturn:
    """Print `configuration error: <problem>` once per problem and exit with status 2 (no traceback)."""
    for problem in problems:
        print(f"configuration error: {problem}", file=sys.stderr)  # noqa: T201 - logging is not set up yet
    raise SystemExit(2)


def gateway() -> Gateway:
    return current_app.extensions["gateway"]


def _json(body: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


# --- routes -----------------------------------------------------------------------------------------------------


def file_link(token: str):
    """A file Dify made, behind a signed link: streamed from Dify on whichever replica gets the request."""
    with log_context(replica=gateway().owner):
        served = gateway().files.serve(token)
        if served.error is not None:
            return _json(served.error, served.status)
        return Response(served.body, status=200, headers=served.headers, direct_passthrough=True)


def push():
    """A message to a long-connection bot's chat, sent once through its connection (services/push)."""
    with log_context(replica=gateway().owner):
        headers = request.headers
        body = request.get_data(cache=False)
        return _answer(gateway().push.accept(headers.get("Authorization"), headers.get("Idempotency-Key"), body))


def push_status(push_id: str):
    """What became of a push: queued, sent or failed."""
    with log_context(replica=gateway().owner):
        return _answer(gateway().push.status(request.headers.get("Authorization"), push_id))


def audit_rows():
    """A page of the audit trail's rows (services/audit/api.py)."""
    with log_context(replica=gateway().owner):
        page = gateway().audit_api.page(request.headers.get("Authorization"), request.args.to_dict())
        return Response(page.body, status=page.status, content_type=page.content_type, headers=page.headers)


def _answer(answer) -> Response:
    response = _json(answer.body, answer.status)
    response.headers.update(answer.headers)
    return response


def healthz():
    """Liveness: the process can serve requests."""
    return _json({"status": "ok"})


def readyz():
    """Readiness: 200 only when Redis (7.0 or later) and (with a bot of AUTH_MODE=external) the user table answer; 503
    names what failed. The body lists each bot: one bot's Dify being down makes no replica unready for the others."""
    failed, bots = gateway().readiness()
    if failed:
        message = ", ".join(f"{k}: {v}" for k, v in failed.items())
        return _json({"error": "not_ready", "message": message, "failed": failed, "bots": bots}, 503)
    return _json({"status": "ready", "bots": bots})


def metrics_endpoint():
    """Prometheus text format (all gunicorn workers' values under gunicorn)."""
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)


# --- errors -----------------------------------------------------------------------------------------------------


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if isinstance(exc, RequestEntityTooLarge):  # refused as a callback's body is (the callback route's bodies)
            refused = errors.body_too_large(app.config["MAX_CONTENT_LENGTH"])
            return _json(*rejected(refused, "", request.remote_addr))
        name = (exc.name or "error").lower().replace(" ", "_")
        return _json({"error": name, "message": exc.description or exc.name}, exc.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        logger.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
        return _json(INTERNAL_ERROR, 500)


if __name__ == "__main__":
    _settings = load_settings_or_exit()
    _app = create_app(_settings)
    _app.extensions["gateway"].start()  # a serving process: the long-connection bots' background work runs here
    if _settings.metrics_port:
        metrics.serve(_settings.host, _settings.metrics_port)
    _app.run(host=_settings.host, port=_settings.port, threaded=True)
