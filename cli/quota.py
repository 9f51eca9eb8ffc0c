"""`flask --app app quota show|reset`: how many questions a user (or a group chat) asked a bot today, and a fresh
count for them."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from cli import chosen_bots, table
from services.chat.quotas import CHAT, USER

quota_cli = AppGroup("quota", help="Daily quotas of questions (QUOTA_USER_MESSAGES_PER_DAY, ...).")


def _who(user: str | None, chat: str | None) -> tuple[str, str]:
    if bool(user) == bool(chat):
        raise click.UsageError("name one user (--user) or one group chat (--chat)")
    return (USER, user) if user else (CHAT, chat)


@quota_cli.command("show")
@click.option("--user", help="A WeCom userid.")
@click.option("--chat", help="A group chat's chatid.")
@click.option("--bot", default=None, help="One bot (default: every bot).")
def show_command(user: str | None, chat: str | None, bot: str | None) -> None:
    """Today's questions of a user or a chat, against each bot's quota."""
    scope, who = _who(user, chat)
    rows = [("bot", "asked today", "quota")]
    for each in chosen_bots(bot):
        limit = each.quotas.limits[scope] if each.quotas is not None else 0
        asked = each.quotas.used(scope, who) if each.quotas is not None else 0
        rows.append((each.name, str(asked), str(limit) if limit else "none"))
    table(rows)


@quota_cli.command("reset")
@click.option("--user", help="A WeCom userid.")
@click.option("--chat", help="A group chat's chatid.")
@click.option("--bot", default=None, help="One bot (default: every bot).")
def reset_command(user: str | None, chat: str | None, bot: str | None) -> None:
    """Give a user or a chat today's quota again."""
    scope, who = _who(user, chat)
    for each in chosen_bots(bot):
        if each.quotas is not None and each.quotas.reset(scope, who):
            click.echo(f"{each.name}: today's count of {scope} {who} reset")
        else:
            click.echo(f"{each.name}: nothing to reset for {scope} {who}")
