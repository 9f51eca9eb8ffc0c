"""Operator commands, run as `flask --app app <group> <command>`."""

from __future__ import annotations

import click
from flask import Flask, current_app


def register_commands(app: Flask) -> None:
    """Attach every command group to the app's CLI."""
    from cli.audit import audit_cli
    from cli.bots import bots_cli
    from cli.db import db_cli
    from cli.quota import quota_cli
    from cli.schedules import schedules_cli
    from cli.streams import streams_cli
    from cli.users import users_cli

    app.cli.add_command(audit_cli)
    app.cli.add_command(bots_cli)
    app.cli.add_command(db_cli)
    app.cli.add_command(quota_cli)
    app.cli.add_command(schedules_cli)
    app.cli.add_command(streams_cli)
    app.cli.add_command(users_cli)


def gateway():
    """The app's Gateway (services/gateway.py)."""
    return current_app.extensions["gateway"]


def user_table():
    """The gateway's user directory, or a clear error when this deployment has none."""
    users = gateway().users
    if users is None:
        raise click.ClickException("no user table here: AUTH_MODE=none and DATABASE_URL is not set")
    return users


def chosen_bots(name: str | None):
    """The bots a command works on: the one named (`--bot`), or every bot of the deployment."""
    every = gateway().bots
    if name is None:
        return [every[bot] for bot in sorted(every)]
    if name not in every:
        raise click.ClickException(f"no bot {name!r} (bots: {', '.join(sorted(every))})")
    return [every[name]]


def table(rows: list[tuple[str, ...]]) -> None:
    """Print rows as aligned columns (the first row is the header)."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(str(value).ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())


bot_option = click.option("--bot", "bot_name", default=None, help="only this bot (default: every bot)")
