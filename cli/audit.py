"""`flask --app app audit export|purge`: the audit trail's rows, written out or deleted past their term
(docs/audit.md)."""

from __future__ import annotations

import sys

import click
from flask.cli import AppGroup
from sqlalchemy.exc import SQLAlchemyError

from cli import gateway
from services.audit.export import FORMATS, lines, parse_time
from services.audit.records import AuditFilter, AuditRecords

audit_cli = AppGroup("audit", help="The audit trail: a row per message (docs/audit.md).")


def _records() -> AuditRecords:
    records = gateway().audit_records
    if records is None:
        raise click.ClickException("the audit trail is off here (AUDIT=off, or no DATABASE_URL)")
    return records


def _time(ctx, param, value: str | None):
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise click.BadParameter("an ISO 8601 time such as 2026-11-01 or 2026-11-01T08:00:00Z") from None


@audit_cli.command("export")
@click.option("--since", callback=_time, help="Rows received at or after this time (ISO 8601; UTC unless it says).")
@click.option("--until", callback=_time, help="Rows received before this time.")
@click.option("--bot", default="", help="One bot's rows.")
@click.option("--user", default="", help="One user's rows (their WeCom userid).")
@click.option("--route", default="", help="One route's rows ('-': the bot's own).")
@click.option("--chat", default="", help="One group chat's rows (its chatid).")
@click.option("--outcome", default="", help="One outcome's rows (answered, note, stopped, blocked, ...).")
@click.option("--text", default="", help="Rows whose question or answer holds this text (where kept).")
@click.option("--kind", default="", help="One kind of row (message, stop, form_action, feedback, push, admin).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jsonl", show_default=True)
def export_command(since, until, bot, user, route, chat, outcome, text, kind, fmt: str) -> None:
    """Write the rows to stdout, oldest first, a page at a time (memory stays flat however many there are)."""
    rows = _records().every(AuditFilter(since, until, bot, user, route, chat, outcome, text, kind))
    try:
        for line in lines(rows, fmt):
            sys.stdout.write(line)
    except SQLAlchemyError as exc:
        raise click.ClickException(f"database unavailable: {type(exc).__name__}") from None


@audit_cli.command("purge")
@click.option("--days", type=click.IntRange(min=1), help="Delete rows older than this (default: AUDIT_RETENTION_DAYS).")
def purge_command(days: int | None) -> None:
    """Delete the rows received more than AUDIT_RETENTION_DAYS (or --days) days ago."""
    days = days or gateway().settings.audit.retention_days
    if not days:
        raise click.ClickException("AUDIT_RETENTION_DAYS is 0 (rows are kept): say --days to purge anyway")
    try:
        deleted = _records().purge(days)
    except SQLAlchemyError as exc:
        raise click.ClickException(f"database unavailable: {type(exc).__name__}") from None
    click.echo(f"deleted {deleted} audit rows older than {days} days")
