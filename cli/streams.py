"""`flask --app app streams ...`: list, show, tail and purge the streams in Redis."""

from __future__ import annotations

import time

import click
from flask.cli import AppGroup

from cli import gateway
from services.streams.inspector import StreamInspector

streams_cli = AppGroup("streams", help="Answers in Redis (the dify_stream:* keys).")


def _inspector() -> StreamInspector:
    return StreamInspector(gateway().redis, gateway().keys)


def _when(timestamp: float | None) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


@streams_cli.command("list")
@click.option("--status", default="", help="pending, streaming, done, error or expired")
@click.option("--user", "userid", default="", help="only this WeCom userid's streams")
@click.option("--limit", default=20, show_default=True)
def list_command(status: str, userid: str, limit: int) -> None:
    """The most recent streams, newest first."""
    rows = [("STREAM", "STATUS", "USER", "CHAT", "CREATED", "TOOK", "POLLS", "OWNER", "ERROR")]
    for s in _inspector().list(status, userid, limit):
        took = f"{s.finished_at - s.created_at:.1f}s" if s.finished_at else "-"
        rows.append(
            (
                s.stream_id,
                s.status,
                s.userid,
                s.chatid or "-",
                _when(s.created_at),
                took,
                str(s.polls),
                s.owner,
                s.error[:40] or "-",
            )
        )
    if len(rows) == 1:
        click.echo("(no streams)")
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())


@streams_cli.command("show")
@click.argument("stream_id")
def show_command(stream_id: str) -> None:
    """One stream: its fields, timings, key TTLs, deltas and text."""
    info = _inspector().describe(stream_id)
    if info is None:
        raise click.ClickException(f"no stream {stream_id} (unknown or expired)")
    meta = info["meta"]
    click.echo(f"stream {stream_id}")
    for name in sorted(meta):
        click.echo(f"  {name:16s} {meta[name]}")
    timings = info["timings"]
    click.echo(f"  {'first token':16s} {timings['first_token_s']} s after the message")
    click.echo(f"  {'finished':16s} {timings['finished_s']} s after the message")
    click.echo(f"  {'lease':16s} {info['lease_holder'] or '-'}")
    click.echo(f"  {'response_url':16s} {'kept (not shown)' if info['has_response_url'] else 'none'}")
    click.echo("  TTLs:  " + "  ".join(f"{name}={ttl}" for name, ttl in info["ttl"].items()))
    click.echo(f"  {len(info['chunks'])} deltas, {len(info['text'])} characters, {info['images']} images")
    click.echo("--- text ---")
    click.echo(info["text"])


@streams_cli.command("tail")
@click.argument("stream_id")
@click.option("--interval", default=0.5, show_default=True, help="seconds between reads")
def tail_command(stream_id: str, interval: float) -> None:
    """Print a stream's deltas as they arrive, until it ends."""
    for kind, value in _inspector().follow(stream_id, interval):
        if kind == "delta":
            click.echo(value, nl=False)
        elif kind == "replaced":
            click.echo(f"\n[answer replaced]\n{value}", nl=False)
        elif kind == "status":
            click.echo(f"\n[{value}]")
        else:
            click.echo(f"\n[no stream {stream_id}]")


@streams_cli.command("purge")
@click.argument("stream_id")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
def purge_command(stream_id: str, yes: bool) -> None:
    """Delete a stream's keys (its bubble then finishes as 'expired or unknown' at the next poll)."""
    if not yes:
        click.confirm(f"Delete stream {stream_id}?", abort=True)
    deleted = _inspector().purge(stream_id)
    click.echo(f"deleted {len(deleted)} keys" + (": " + ", ".join(deleted) if deleted else ""))
