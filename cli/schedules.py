"""`flask --app app schedules list|run`: each schedule's next tick and what became of its latest, and one tick run
now, as the timetable would run it (its answer pushed to its targets), followed here to its end."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from cli import gateway, table

schedules_cli = AppGroup("schedules", help="Schedules: questions asked on a timetable, their answers pushed.")


@schedules_cli.command("list")
def list_command() -> None:
    """Each schedule: its timetable, its next tick, its latest tick and what became of it."""
    rows = gateway().scheduler.report()
    if not rows:
        click.echo("no schedules: a bot's table in BOTS_FILE lists them as [[bots.<name>.schedules]]")
        return
    columns = ("bot", "schedule", "cron", "next", "last", "outcome")
    table([columns, *[tuple(row[c] for c in columns) for row in rows]])


@schedules_cli.command("run")
@click.argument("name")
@click.option("--bot", "bot_name", default=None, help="the bot whose schedule it is (needed with several bots)")
@click.option("--wait", default=600.0, show_default=True, help="seconds to follow the tick before leaving it")
def run_command(name: str, bot_name: str | None, wait: float) -> None:
    """Run one tick of schedule NAME now: ask, then push the answer to each target once."""
    scheduler = gateway().scheduler
    owners = [bot for bot, scheduled in scheduler.bots.items() if name in scheduled.timetables]
    if bot_name is not None:
        owners = [bot for bot in owners if bot == bot_name]
    if not owners:
        raise click.ClickException(f"no schedule {name!r}{f' in bot {bot_name!r}' if bot_name else ''}")
    if len(owners) > 1:
        raise click.ClickException(f"bots {', '.join(owners)} each have a schedule {name!r}: name one with --bot")
    tick = scheduler.run_now(owners[0], name)
    click.echo(f"schedule {name} of bot {owners[0]}: tick {tick} started")
    state = scheduler.settle(owners[0], name, tick, wait)
    if state is None or state.status not in ("pushed", "partial", "failed", "skipped"):
        raise click.ClickException(f"tick {tick} not settled after {wait:.0f} s: the serving replicas follow it on")
    for target, said in state.pushed.items():
        click.echo(f"  {target}: {said}")
    click.echo(f"tick {tick}: {state.status}{f' ({state.why})' if state.why else ''}")
    if state.status == "failed":
        raise SystemExit(1)
