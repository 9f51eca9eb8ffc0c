"""The demo around the production app: `create_app()` here wraps `app.create_app()` and adds what a local run
needs and production never has: the Dify and auth API stand-ins (started where the demo settings point:
DEMO_DEFAULTS in config/settings.py), the seeded demo users, and the browser console.

    python -m demo          the gateway plus a chat in this terminal (`make demo`)
    python -m demo.serve    the gateway alone, on the development server
    flask --app demo.app …  the operator commands, with the demo's settings (they start no background work)

Only these read demo.env (config.settings.DEMO_ENV_FILES); the production app never does.

Production code never imports this package; this package builds on it.
"""

from __future__ import annotations

import logging
import socket
from urllib.parse import urlsplit

from flask import Flask

import app as gateway_app
from config.settings import DEMO_DEFAULTS, DEMO_ENV_FILES, Settings, webhook_key
from demo.auth_standin import AuthStandIn
from demo.console import console
from demo.dify_standin import DifyStandIn
from demo.openai_standin import OpenAIStandIn
from demo.wecom_api_standin import WeComApiStandIn
from demo.wecom_ws_standin import WeComWebSocketStandIn
from services.auth import db
from services.auth.users import UserExists
from services.gateway import Gateway

logger = logging.getLogger(__name__)

# alice may use the bot; bob is disabled; anyone else (e.g. eve) is unknown.
DEMO_USERS = (("alice", "alice@example.com", "Alice", True), ("bob", "bob@example.com", "Bob", False))
_started: dict[str, object] = {}  # url -> the stand-in this process started there


def create_app(settings: Settings | None = None) -> Flask:
    """The gateway in demo mode, with its stand-ins, demo users and console."""
    settings = settings or gateway_app.load_settings_or_exit(DEMO_ENV_FILES)
    if settings.demo_mode and not gateway_app.running_a_command():  # a command asks the demo that runs
        start_standins(gateway_app.load_bots_or_exit(settings)[0], settings.wecom_api_base)
    app = gateway_app.create_app(settings)
    gateway: Gateway = app.extensions["gateway"]
    if settings.demo_mode and gateway.users is not None:
        seed_demo_users(gateway)
    app.register_blueprint(console)
    return app


def start_standins(bots: tuple[Settings, ...], wecom_api_base: str = "") -> None:
    """Start the Dify and auth API stand-ins at the demo's own loopback addresses (DEMO_DEFAULTS, demo/bots.toml),
    unless something answers there already (another demo process, or `python -m demo.standins`). The Dify
    stand-in answers each bot (told apart by its API key) as that bot, in its language. An address of the user's
    (their own Dify, or a server they meant to start) never gets a stand-in: a bot there answers from it, or says
    it cannot (announce). WeCom's HTTP APIs (the bots' group robots) get one at `wecom_api_base`, a loopback
    address."""
    apps = [(bot.name, bot) for bot in bots] + [(f"{b.name} {r.name}", r.settings) for b in bots for r in b.routes]
    for url in {bot.dify.base_url for _, bot in apps if plays_dify(bot)}:
        if _needs_standin(url):
            host, port = _address(url)
            personas = {bot.dify.api_key: (name, bot.language) for name, bot in apps if plays_dify(bot)}
            _started[url] = DifyStandIn(host=host, port=port, personas=personas).start()
            logger.warning("demo: answering with the built-in Dify stand-in at %s", url)
    for url in {bot.openai.base_url for _, bot in apps if plays_model(bot)}:
        if _needs_standin(url):
            host, port = _address(url)
            _started[url] = OpenAIStandIn(model=DEMO_DEFAULTS["openai_model"], host=host, port=port).start()
            logger.warning("demo: answering with the built-in OpenAI-compatible stand-in at %s", url)
    for bot in bots:
        if bot.wecom.mode == "long_connection" and _needs_standin(bot.connection.ws_url):
            host, port = _address(bot.connection.ws_url)
            standin = WeComWebSocketStandIn({bot.connection.bot_id: bot.connection.bot_secret}, host=host, port=port)
            _started[bot.connection.ws_url] = standin.start()
            logger.warning("demo: WeCom's long connection played by the built-in stand-in at %s", bot.connection.ws_url)
        if bot.auth.mode == "external" and _needs_standin(bot.auth.api_url):
            host, port = _address(bot.auth.api_url)
            _started[bot.auth.api_url] = AuthStandIn(api_key=bot.auth.api_key, host=host, port=port).start()
            logger.warning("demo: authenticating with the built-in auth stand-in at %s", bot.auth.api_url)
    robots = tuple(webhook_key(url) for bot in bots for url in bot.wecom.webhook_urls().values())
    if robots and wecom_api_base and _needs_standin(wecom_api_base):
        host, port = _address(wecom_api_base)
        _started[wecom_api_base] = WeComApiStandIn(keys=robots, host=host, port=port).start()
        logger.warning("demo: WeCom's group robots played by the built-in stand-in at %s", wecom_api_base)


def plays_dify(bot: Settings) -> bool:
    """Whether the bot's Dify is the demo's stand-in (its own address), not a Dify of the user's."""
    return bot.backend == "dify" and bot.dify.base_url == DEMO_DEFAULTS["dify_base_url"]


def plays_model(bot: Settings) -> bool:
    """Whether the bot's OpenAI-compatible server is the demo's stand-in, not one of the user's."""
    return bot.backend == "openai" and bot.openai.base_url == DEMO_DEFAULTS["openai_base_url"]


def announce(gateway: Gateway, url: str) -> None:
    """Say where each bot listens and which Dify answers it; a Dify of the user's is asked once whether it takes
    the key, so a wrong key or address is one line now rather than a note at the first message."""
    for name, bot in gateway.bots.items():
        where = f"at {url}{bot.settings.wecom.callback_path}"
        if bot.delivery.mode != "callback":
            where = "over WeCom's WebSocket (the built-in stand-in)"
        source = _source(bot)
        print(f"Bot {name!r} {where}, answered by {source}{'' if source.endswith(('.', '?')) else '.'}")
        if bot.settings.routes:
            routes = ", ".join(f"{r.command or r.name} ({r.settings.backend})" for r in bot.settings.routes)
            print(f"  Its routes: {routes}; /routes in the chat lists them.")


def _source(bot) -> str:
    """Which backend answers a demo bot, said as a newcomer reads it; one of the user's is asked whether it answers."""
    settings = bot.settings
    if plays_dify(settings):
        return "the built-in Dify stand-in"
    if plays_model(settings):
        return "the built-in OpenAI-compatible stand-in"
    problem = bot.streams.backends[""].check()
    if settings.backend == "openai":
        return f"your OpenAI-compatible server at {settings.openai.base_url}: " + (problem or "it answers")
    return f"your Dify at {settings.dify.base_url}: " + (problem or "it takes the key")


def websocket_standin(url: str) -> WeComWebSocketStandIn | None:
    """The WeCom WebSocket stand-in this process started at `url` (the console talks to a long-connection bot
    through it)."""
    standin = _started.get(url)
    return standin if isinstance(standin, WeComWebSocketStandIn) else None


def robot_messages() -> list[dict]:
    """What the group robots' stand-in this process started took, in order (the console shows them)."""
    found = [standin for standin in _started.values() if isinstance(standin, WeComApiStandIn)]
    return [{"key": sent.key, "body": sent.body, "at": sent.at} for standin in found for sent in standin.sent]


def seed_demo_users(gateway: Gateway) -> None:
    """Create the schema and the demo users if they are missing."""
    db.init_schema(gateway.users.engine)
    for userid, account, name, enabled in DEMO_USERS:
        if gateway.users.find(userid) is None:
            try:
                gateway.users.add(userid, account, name, enabled)
            except UserExists:
                continue  # another demo process of this checkout seeded it a moment ago


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _needs_standin(url: str) -> bool:
    """A loopback URL that nothing answers yet (and that this process has not served already)."""
    host, port = _address(url)
    if url in _started or host not in ("127.0.0.1", "localhost"):
        return False
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return False
    except OSError:
        return True
