"""A bot's arrays of named tables in a bots file (`[[bots.<name>.routes]]`, `[[bots.<name>.schedules]]`): each
table's name checked (1 to 32 of a-z, 0-9, _ and -; once in the bot), and where it is, for its problems' lines."""

from __future__ import annotations

from config.settings import WEBHOOK_NAME


def named_tables(tables, bot_where: str, kind: str, problems: list[str]) -> list[tuple[str, str, dict]]:
    """(name, where, table) of each table of `kind` ("route", "schedule") whose name is good, in the file's order;
    the others' problems added, one line each."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        problems.append(f"{bot_where}: {kind}s must be tables ([[bots.<name>.{kind}s]])")
        return []
    found: list[tuple[str, str, dict]] = []
    for number, table in enumerate(tables, start=1):
        name = table.get("name")
        where = f"{bot_where} {kind} {name if isinstance(name, str) and name else f'#{number}'}"
        if not isinstance(name, str) or not WEBHOOK_NAME.fullmatch(name):
            problems.append(f"{where}: name must be 1 to 32 of a-z, 0-9, _ and -")
        elif name in {taken for taken, _, _ in found}:
            problems.append(f"{where}: name is another {kind}'s of this bot already")
        else:
            found.append((name, where, table))
    return found
