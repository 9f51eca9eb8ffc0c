"""`flask --app app bots list`: each bot of the deployment, its mode, path, Dify app and whether Dify answers."""

from __future__ import annotations

from urllib.parse import urlsplit

import click
from flask.cli import AppGroup

from cli import gateway, table
from services.transport.errors import BackendError

bots_cli = AppGroup("bots", help="The bots this deployment serves (BOTS_FILE, or the environment's one).")


@bots_cli.command("list")
@click.option("--timeout", default=3.0, show_default=True, help="seconds to wait for each bot's Dify")
def list_command(timeout: float) -> None:
    """Each bot: its mode, callback path, Dify host and app type, who may ask, and whether its Dify app answers."""
    rows = [("BOT", "MODE", "PATH", "DIFY", "APP", "AUTH", "HEALTH")]
    for name, bot in sorted(gateway().bots.items()):
        settings = bot.settings
        health = _health(bot, timeout)
        rows.append(
            (
                name,
                settings.wecom.mode,
                settings.wecom.callback_path,
                urlsplit(settings.dify.base_url).netloc,
                _app_type(bot, timeout) if health == "ok" else bot.profile.configured_type,
                settings.auth.mode,
                health,
            )
        )
    table(rows)


def _app_type(bot, timeout: float) -> str:
    """The bot's Dify app type: as configured, or `auto: <the mode /info names>`."""
    if bot.profile.configured_type != "auto":
        return bot.profile.configured_type
    return f"auto: {bot.profile.app_type(timeout)}"


def _health(bot, timeout: float) -> str:
    """`ok` when the bot's Dify app answers its key (GET /parameters), else why not."""
    try:
        bot.dify.parameters(timeout)
    except BackendError as exc:
        return f"dify: {exc.code}" + (f" (HTTP {exc.status})" if exc.status else "")
    return "ok"
