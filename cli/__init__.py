"""Operator commands, run as `flask --app app <group> <command>`."""

from __future__ import annotations

import click
from flask import Flask, current_app


def register_commands(app: Flask) -> None:
    """Attach every command group to the app's CLI."""
    from cli.db import db_cli
    from cli.streams import streams_cli
    from cli.users import users_cli

    app.cli.add_command(db_cli)
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
