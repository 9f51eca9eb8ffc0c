"""`flask --app app users ...`: add, disable, enable and list the WeCom users allowed to use the bots.

One user table serves every bot of the deployment: a WeCom userid is the same person in every bot of the
enterprise, and operators keep one list. What differs per bot (a cached token, the conversations) is shown per
bot by `users token`.
"""

from __future__ import annotations

import click
from flask.cli import AppGroup

from cli import bot_option, chosen_bots, gateway, table, user_table
from services.auth.users import UserExists
from services.streams.inspector import StreamInspector

users_cli = AppGroup("users", help="Who may use the bot (the wecom_users table).")


@users_cli.command("add")
@click.argument("userid")
@click.argument("account")
@click.option("--name", "display_name", default=None, help="display name")
@click.option("--disabled", is_flag=True, help="add the user disabled")
def add_command(userid: str, account: str, display_name: str | None, disabled: bool) -> None:
    """Allow USERID (the WeCom userid), known to the auth API as ACCOUNT."""
    if len(userid) > 64 or len(account) > 128:
        raise click.BadParameter("userid is at most 64 characters, account at most 128")
    try:
        user_table().add(userid, account, display_name, enabled=not disabled)
    except UserExists:
        raise click.ClickException(f"user {userid} already exists (use enable/disable)") from None
    click.echo(f"added {userid} ({account}){' disabled' if disabled else ''}")


@users_cli.command("disable")
@click.argument("userid")
def disable_command(userid: str) -> None:
    """Stop USERID from using the bots now (the tokens cached for every bot are revoked too)."""
    _set_enabled(userid, False)


@users_cli.command("enable")
@click.argument("userid")
def enable_command(userid: str) -> None:
    """Let USERID use the bots again."""
    _set_enabled(userid, True)


def _set_enabled(userid: str, enabled: bool) -> None:
    if not user_table().set_enabled(userid, enabled):
        raise click.ClickException(f"no user {userid}")
    for bot in gateway().bots.values():
        if bot.authorizer is not None:
            bot.authorizer.revoke(userid)
    click.echo(f"{'enabled' if enabled else 'disabled'} {userid}")


@users_cli.command("list")
@click.option("--limit", default=100, show_default=True)
@click.option("--offset", default=0, show_default=True)
def list_command(limit: int, offset: int) -> None:
    """List users, ordered by userid."""
    rows = [
        (u.userid, u.account, u.display_name or "", "yes" if u.enabled else "no")
        for u in user_table().list(limit, offset)
    ]
    table([("USERID", "ACCOUNT", "NAME", "ENABLED"), *rows])
    if not rows:
        click.echo("(no users)")


@users_cli.command("token")
@click.argument("userid")
@bot_option
def token_command(userid: str, bot_name: str | None) -> None:
    """Whether USERID has a cached auth token (never shown), and the Dify conversations it continues, per bot."""
    several = len(gateway().bots) > 1
    for bot in chosen_bots(bot_name):
        heading = f"[{bot.name}] " if several else ""
        if bot.authorizer is None:
            click.echo(f"{heading}AUTH_MODE=none: no tokens")
        else:
            status = bot.authorizer.token_status(userid)
            cached = f"cached, expires in {status['ttl']}s" if status["cached"] else "not cached"
            click.echo(f"{heading}token: {cached}; single flight: {status['flight'] or '-'}")
        conversations = StreamInspector(gateway().redis, bot.keys).conversations_of(userid)
        if not conversations:
            click.echo(f"{heading}conversations: none")
        for key, conversation_id, ttl in conversations:
            click.echo(f"{heading}conversation {conversation_id}  ({key}, expires in {ttl}s)")
