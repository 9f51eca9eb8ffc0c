"""`flask --app app bots list|check|routes|which`: each bot of the deployment, its mode, path and backend, whether
its backends answer, its routes, and the route a given message would take."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from cli import bot_option, chosen_bots, gateway, table
from services.chat.routes import OWN

bots_cli = AppGroup("bots", help="The bots this deployment serves (BOTS_FILE, or the environment's one).")


@bots_cli.command("list")
@click.option("--timeout", default=3.0, show_default=True, help="seconds to wait for each bot's backend")
def list_command(timeout: float) -> None:
    """Each bot: its mode, callback path, backend (where, and a Dify app's type), who may ask, how many routes it
    has, and whether its backend answers."""
    rows = [("BOT", "MODE", "PATH", "BACKEND", "AT", "APP", "AUTH", "ROUTES", "HEALTH")]
    for name, bot in sorted(gateway().bots.items()):
        settings, backend = bot.settings, bot.streams.backends[OWN]
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
                str(len(settings.routes)),  # (bots routes lists them)
                f"{backend.name}: {problem}" if problem else "ok",
            )
        )
    table(rows)


@bots_cli.command("check")
@bot_option
@click.option("--timeout", default=5.0, show_default=True, help="seconds to wait for each bot's backend")
def check_command(bot_name: str | None, timeout: float) -> None:
    """Ask each bot's backend, and each of its routes' (Dify: GET /parameters; an OpenAI-compatible server:
    GET /models), whether it answers with its settings: one line each; the exit status is 1 when any does not."""
    failed = 0
    for bot in chosen_bots(bot_name):
        for route, backend in bot.streams.backends.items():
            problem = backend.check(timeout)
            failed += bool(problem)
            name = f"{bot.name} route {route}" if route else bot.name
            click.echo(f"{name}: {backend.name} at {backend.where()}: {problem or 'reachable'}")
    if failed:
        raise SystemExit(1)


@bots_cli.command("routes")
@bot_option
def routes_command(bot_name: str | None) -> None:
    """Each bot's routes in the order they are tried: the messages each takes and the backend that answers them;
    then what answers a message no route takes."""
    rows = [("BOT", "ROUTE", "COMMAND", "CHATS", "USERS", "BACKEND", "AT")]
    for bot in chosen_bots(bot_name):
        backends = bot.streams.backends
        for route in bot.settings.routes:
            backend = backends[route.name]
            chats, users = ", ".join(route.chats) or "any", ", ".join(route.users) or "any"
            rows.append((bot.name, route.name, route.command or "-", chats, users, backend.name, backend.where()))
        if bot.settings.no_route_reply:
            rows.append((bot.name, "(none)", "-", "any", "any", "no_route_reply", "-"))
        else:
            rows.append((bot.name, "(own)", "-", "any", "any", backends[OWN].name, backends[OWN].where()))
    table(rows)


@bots_cli.command("which")
@click.option("--bot", "bot_name", required=True, help="the bot the message is sent to")
@click.option("--user", "userid", required=True, help="the WeCom userid of its sender")
@click.option("--chat", "chatid", default="", help="the group chat's id (none: a 1:1 chat)")
@click.option("--text", required=True, help="the message as sent (a group's @mention taken off)")
def which_command(bot_name: str, userid: str, chatid: str, text: str) -> None:
    """The route a message would take, and why (the first route whose every condition holds)."""
    (bot,) = chosen_bots(bot_name)
    choice = bot.callback.intake.routing.table.choose(text.strip(), userid, chatid)
    if choice.route:
        backend = bot.streams.backends[choice.route]
        click.echo(f"{choice.why}; answered by {backend.name} at {backend.where()}; the question: {choice.question!r}")
    elif bot.settings.no_route_reply:
        click.echo(f"no route takes it: answered with no_route_reply ({bot.settings.no_route_reply!r})")
    else:
        backend = bot.streams.backends[OWN]
        click.echo(f"no route takes it: the bot's own backend, {backend.name} at {backend.where()}")


def _app_type(bot, timeout: float, asked: bool) -> str:
    """The bot's Dify app type: as configured, or (`asked`: its app answers) `auto: <the mode /info names>`; "-" for
    another backend."""
    if bot.settings.backend != "dify":
        return "-"
    if bot.profile.configured_type != "auto" or not asked:
        return bot.profile.configured_type
    return f"auto: {bot.profile.app_type(timeout)}"
