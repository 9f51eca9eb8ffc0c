"""Operator commands, run as `flask --app app <group> <command>`."""

from __future__ import annotations

from flask import Flask


def register_commands(app: Flask) -> None:
    """Attach every command group to the app's CLI."""
    from cli.db import db_cli
    from cli.streams import streams_cli
    from cli.users import users_cli

    app.cli.add_command(db_cli)
    app.cli.add_command(streams_cli)
    app.cli.add_command(users_cli)
