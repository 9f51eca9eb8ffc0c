"""`flask --app app bots list|check`: each bot of the deployment, its mode, path and backend, and whether its backend
answers."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from cli import bot_option, chosen_bots, gateway, table

bots_cli = AppGroup("bots", help="The bots this deployment serves (BOTS_FILE, or the environment's one).")


@bots_cli.command("list")
@click.option("--timeout", default=3.0, show_default=True, help="seconds to wait for each bot's backend")
def list_command(timeout: float) -> None:
    """Each bot: its mode, callback path, backend (where, and a Dify app's type), who may ask, and whether its
    backend answers."""
    rows = [("BOT", "MODE", "PATH", "BACKEND", "AT", "APP", "AUTH", "HEALTH")]
    for name, bot in sorted(gateway().bots.items()):
        settings, backend = bot.settings, bot.streams.backend
        problem = backend.check(timeout)
        rows.append(
            (
                name,
                settings.wecom.mode,
                settings.wecom.callback_path,
                backend.name,
                backend.where(),
                _app_type(bot, timeout, asked=not problem),
                settings.auth.mode,
                f"{backend.name}: {problem}" if problem else "ok",
            )
        )
    table(rows)


@bots_cli.command("check")
@bot_option
@click.option("--timeout", default=5.0, show_default=True, help="seconds to wait for each bot's backend")
def check_command(bot_name: str | None, timeout: float) -> None:
    """Ask each bot's backend (Dify: GET /parameters; an OpenAI-compatible server: GET /models) whether it answers
    with the bot's settings: one line per bot; the exit status is 1 when any does not."""
    failed = 0
    for bot in chosen_bots(bot_name):
        backend = bot.streams.backend
        problem = backend.check(timeout)
        failed += bool(problem)
        click.echo(f"{bot.name}: {backend.name} at {backend.where()}: {problem or 'reachable'}")
    if failed:
        raise SystemExit(1)


def _app_type(bot, timeout: float, asked: bool) -> str:
    """The bot's Dify app type: as configured, or (`asked`: its app answers) `auto: <the mode /info names>`; "-" for
    another backend."""
    if bot.settings.backend != "dify":
        return "-"
    if bot.profile.configured_type != "auto" or not asked:
        return bot.profile.configured_type
    return f"auto: {bot.profile.app_type(timeout)}"
