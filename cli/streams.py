"""`flask --app app streams ...`: list, show, tail and purge the streams in Redis."""

from __future__ import annotations

import time

import click
from flask.cli import AppGroup

from cli import bot_option, chosen_bots, gateway, table
from services.streams.inspector import StreamInspector

streams_cli = AppGroup("streams", help="Answers in Redis (the dify_stream:* keys).")


def _inspectors(bot_name: str | None) -> list[tuple[str, StreamInspector]]:
    """(bot, its inspector) for the bot named, or for every bot."""
    return [(bot.name, StreamInspector(gateway().redis, bot.keys)) for bot in chosen_bots(bot_name)]


def _inspector_of(stream_id: str, bot_name: str | None) -> StreamInspector:
    """The inspector of the bot whose stream `stream_id` is (looked for in every bot without `--bot`)."""
    for _, inspector in _inspectors(bot_name):
        if inspector.exists(stream_id):
            return inspector
    raise click.ClickException(f"no stream {stream_id} (unknown or expired)")


def _when(timestamp: float | None) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


@streams_cli.command("list")
@click.option("--status", default="", help="pending, streaming, done, error or expired")
@click.option("--user", "userid", default="", help="only this WeCom userid's streams")
@click.option("--limit", default=20, show_default=True)
@bot_option
def list_command(status: str, userid: str, limit: int, bot_name: str | None) -> None:
    """The most recent streams, newest first."""
    found = [(bot, s) for bot, inspector in _inspectors(bot_name) for s in inspector.list(status, userid, limit)]
    found = sorted(found, key=lambda pair: pair[1].created_at, reverse=True)[:limit]
    if not found:
        click.echo("(no streams)")
        return
    rows = [("BOT", "STREAM", "STATUS", "USER", "CHAT", "CREATED", "TOOK", "POLLS", "OWNER", "ERROR")]
    for bot, s in found:
        took = f"{s.finished_at - s.created_at:.1f}s" if s.finished_at else "-"
        rows.append(
            (
                bot,
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
    table(rows)


@streams_cli.command("show")
@click.argument("stream_id")
@bot_option
def show_command(stream_id: str, bot_name: str | None) -> None:
    """One stream: its fields, timings, key TTLs, deltas and text."""
    info = _inspector_of(stream_id, bot_name).describe(stream_id)
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
@bot_option
def tail_command(stream_id: str, interval: float, bot_name: str | None) -> None:
    """Print a stream's deltas as they arrive, until it ends."""
    for kind, value in _inspector_of(stream_id, bot_name).follow(stream_id, interval):
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
@bot_option
def purge_command(stream_id: str, yes: bool, bot_name: str | None) -> None:
    """Delete a stream's keys (its bubble then finishes as 'expired or unknown' at the next poll)."""
    inspector = _inspector_of(stream_id, bot_name)
    if not yes:
        click.confirm(f"Delete stream {stream_id}?", abort=True)
    deleted = inspector.purge(stream_id)
    click.echo(f"deleted {len(deleted)} keys" + (": " + ", ".join(deleted) if deleted else ""))
