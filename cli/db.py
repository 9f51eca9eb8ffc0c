"""`flask --app app db init`: create the schema (safe to run again; existing rows are kept)."""

from __future__ import annotations

import click
from flask.cli import AppGroup
from sqlalchemy.exc import SQLAlchemyError

from cli import user_table
from services.audit import table as audit_table
from services.auth import db
from services.callback import kept_ends  # noqa: F401 -- registers wecom_kept_ends
from services.callback import spool as callback_spool  # noqa: F401 -- registers wecom_callback_spool
from services.longconn import spool as ws_spool  # noqa: F401 -- registers wecom_ws_spool

db_cli = AppGroup("db", help="Database schema.")


@db_cli.command("init")
def init_command() -> None:
    """Create the wecom_users, wecom_audit, wecom_callback_spool, wecom_ws_spool and wecom_kept_ends tables if they
    do not exist."""
    engine = user_table().engine
    try:
        db.init_schema(engine)
        audit_table.ensure_table(engine)
    except SQLAlchemyError as exc:
        raise click.ClickException(f"database unavailable: {type(exc).__name__}: {exc.__cause__ or exc}") from None
    tables = "wecom_users, wecom_audit, wecom_callback_spool, wecom_ws_spool, wecom_kept_ends"
    click.echo(f"schema ready on {engine.url.render_as_string(hide_password=True)}: {tables}")
