"""Several bots in one deployment (docs/configuration.md): `BOTS_FILE` names a TOML file with one table per bot.

    [bots.hr]
    callback_path = "/wecom/callback/hr"      # default /wecom/callback/<name>
    token_file = "/run/secrets/hr/token"      # or token = "..."
    encoding_aes_key_file = "/run/secrets/hr/aes-key"
    dify_api_key_file = "/run/secrets/hr/dify-api-key"
    bot_language = "zh"

Each bot becomes a `BotSettings`: the per-bot settings of its table (the setting names in lower case, or the
short names above; docs/configuration.md), every other one from the environment, as without the file. Without
`BOTS_FILE` the environment alone defines one bot, `default`, unchanged. A bad file is one line per problem, naming
the bot and the key. Two bots may not share a WeCom credential (a table without its own takes the environment's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from pathlib import Path

from config.schedules import load_schedules
from config.settings import VARIABLES, BotSettings, RouteSettings, Settings, SettingsError, setting_in
from config.tables import named_tables

DEFAULT_BOT = "default"
NAME_PATTERN = re.compile(r"[a-z0-9_-]{1,32}")
RESERVED_PATHS = ("/healthz", "/readyz", "/metrics", "/console")

# Settings each bot may set for itself (BotSettings); the rest (Redis, the database, the process, logging) is the
# deployment's.
PER_BOT_FIELDS = frozenset(name for name, setting in VARIABLES.items() if setting.per_bot and setting.variable)
# The short names a bot's table may use (docs/configuration.md), for the settings' own names.
ALIASES = {
    "mode": "wecom_mode",
    "bot_id": "wecom_bot_id",
    "secret": "wecom_bot_secret",
    "token": "wecom_token",
    "encoding_aes_key": "wecom_encoding_aes_key",
    "callback_path": "wecom_callback_path",
    "webhooks": "wecom_webhooks",  # a table of its own in a bot's table (_webhooks)
    "app_corp_id": "wecom_app_corp_id",
    "app_agent_id": "wecom_app_agent_id",
    "app_secret": "wecom_app_secret",
}
_KEY_OF = {field: alias for alias, field in ALIASES.items()}
_FROM_FILE = frozenset(name for name, setting in VARIABLES.items() if setting.from_file)
_TYPES = {name: setting.kind.__name__ for name, setting in VARIABLES.items()}


def bot_keys(name: str) -> str:
    """The Redis key prefix of a bot's keys (after REDIS_KEY_PREFIX): none for `default`, so a deployment that
    moves from the environment to a file, keeping its bot as `default`, keeps its keys."""
    return "" if name == DEFAULT_BOT else f"bot:{name}:"


def load_bots(settings: Settings, text: str | None = None) -> tuple[BotSettings, ...]:
    """The settings of each bot of the deployment (the environment's one bot, as `default`, without BOTS_FILE).
    `text` is the file's text when the caller read it already (or a last good copy's); BOTS_FILE's folder anchors
    the tables' relative secret files either way.

    Raises:
        SettingsError: every problem of the file, one line each, naming the bot and the key.
    """
    if not settings.bots_file:
        return (settings.bot,)
    tables = _tables(_read(settings.bots_file) if text is None else text, settings.bots_file)
    problems: list[str] = []
    bots: list[BotSettings] = []
    for name, table in tables.items():
        where = f"BOTS_FILE bots.{name}"
        if not NAME_PATTERN.fullmatch(name):
            problems.append(f"{where}: the name must be 1 to 32 of a-z, 0-9, _ and -")
            continue
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table ([bots.{name}])")
            continue
        folder = Path(settings.bots_file).parent
        route_tables = table.get("routes", [])
        own = {k: v for k, v in table.items() if k not in ("routes", "webhooks", "schedules")}
        values, found = _values(own, where, folder)
        problems += found
        if "webhooks" in table:
            values["wecom_webhooks"] = _webhooks(table["webhooks"], where, folder, problems)
        values.setdefault("wecom_callback_path", f"/wecom/callback/{name}")
        values["bot_name"] = name
        bot = _settings_of(settings, values, where, found, problems)
        if bot is not None:
            bot = dataclasses.replace(bot, routes=_routes(route_tables, settings, values, where, folder, problems))
            schedules = load_schedules(table.get("schedules", []), bot, where, problems)
            bots.append(dataclasses.replace(bot, schedules=schedules))
    problems += _clashes(bots)
    if not tables:
        problems.append("BOTS_FILE names no bot: add a table such as [bots.hr]")
    if problems:
        raise SettingsError(problems)
    return tuple(bots)


def _settings_of(
    settings: Settings, values: dict, where: str, found: _Found, problems: list[str]
) -> BotSettings | None:
    """The bot's settings of a table's `values` on the deployment's, or None with its problems added."""
    try:
        return settings.replace(**values).bot
    except SettingsError as exc:
        reported = {_key(field) for field in found.fields}  # e.g. a secret whose file could not be read
        for problem in (_in_file_terms(p) for p in exc.problems):
            if problem.partition(" ")[0] not in reported:
                problems.append(f"{where}: {problem}")
        return None


# A route's own keys; the rest of its table is the backend that answers it (ROUTE_SETTINGS), the bot's for any key
# it does not give. How a bot keeps conversations (GROUP_CONVERSATION) is the bot's, for all of its routes.
ROUTE_KEYS = ("name", "command", "chats", "users")
ROUTE_SETTINGS = frozenset(
    name
    for name, setting in VARIABLES.items()
    if setting.path[:2] in (("bot", "dify"), ("bot", "openai")) or name == "backend"
) - {"group_conversation"}
# The commands the gateway answers itself (services/chat/queries.py), which no route may take.
BUILT_IN_COMMANDS = frozenset({"/new", "/reset", "/新对话", "/help", "/stop", "/停止", "/cancel", "/routes"})


def _routes(
    tables, settings: Settings, bot_values: dict, bot_where: str, folder: Path, problems: list[str]
) -> tuple[RouteSettings, ...]:
    """A bot's routes, in the file's order (the first that takes a message answers it); their problems added, one
    line each naming bot, route and key."""
    routes: list[RouteSettings] = []
    for name, where, table in named_tables(tables, bot_where, "route", problems):
        given = {k: v for k, v in table.items() if k not in ROUTE_KEYS}
        unknown = sorted(k for k in given if k.removesuffix("_file") not in ROUTE_SETTINGS)
        problems += [
            f"{where}: unknown key {key!r} (a route gives command, chats, users and backend keys)" for key in unknown
        ]
        conditions = _conditions(table, where, problems)
        values, found = _values({k: v for k, v in given.items() if k not in unknown}, where, folder)
        problems += found
        answering = _settings_of(settings, {**bot_values, **values}, where, found, problems)
        if conditions is not None and answering is not None and not unknown:
            routes.append(RouteSettings(name, answering, *conditions))
    return tuple(routes)


def _conditions(table: dict, where: str, problems: list[str]) -> tuple[str, tuple, tuple] | None:
    """A route's (command, chats, users), or None with its problems added (at least one must be given)."""
    command, chats, users = table.get("command", ""), table.get("chats", []), table.get("users", [])
    bad = len(problems)
    if not isinstance(command, str) or (command and not re.fullmatch(r"/\S{1,32}", command)):
        problems.append(f'{where}: command must be one word beginning with / (such as "/hr")')
    elif command.lower() in BUILT_IN_COMMANDS:
        problems.append(f"{where}: command {command} is the gateway's own")
    for key, value in (("chats", chats), ("users", users)):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            problems.append(f"{where}: {key} must be a list of ids")
    if len(problems) > bad:
        return None
    if not (command or chats or users):
        problems.append(f"{where}: a route needs at least one of command, chats and users")
        return None
    return command.lower(), tuple(chats), tuple(users)


LAST_GOOD_COPY = "bots.last-good.toml"
# Names the folder of a replica's processes (set by gunicorn.conf.py for the master and its workers).
RUN_DIR_VARIABLE = "GATEWAY_RUN_DIR"


def load_bots_keeping_last_good(settings: Settings, folder: Path) -> tuple[tuple[BotSettings, ...], list[str]]:
    """The bots, as `load_bots`, for a process among others of one replica that share `folder` (gunicorn's
    master and workers): a file that loads is copied there; a file that does not, once a copy exists, gives the
    copy's bots, and its problems are returned to be logged. So a HUP or a worker's restart after a bad edit
    keeps the replica serving the bots it had, where failing would stop it.

    Raises:
        SettingsError: the file's problems, when no good copy of it exists yet (at start-up).
    """
    if not settings.bots_file:
        return load_bots(settings), []
    copy = folder / LAST_GOOD_COPY
    try:
        bots, text = read_bots(settings)
    except SettingsError as exc:
        if not copy.is_file():
            raise
        return load_bots(settings, copy.read_text(encoding="utf-8")), exc.problems
    keep_last_good(folder, text)
    return bots, []


def read_bots(settings: Settings) -> tuple[tuple[BotSettings, ...], str]:
    """The bots of BOTS_FILE as it is now, and the text they were read from (read once: a copy of it is the text
    that loaded, whatever the file is a moment later).

    Raises:
        SettingsError: as `load_bots`.
    """
    text = read_text(settings)
    return load_bots(settings, text), text


def read_text(settings: Settings) -> str:
    """BOTS_FILE's text.

    Raises:
        SettingsError: it cannot be read, or is not UTF-8 text.
    """
    return _read(settings.bots_file)


def files_named(settings: Settings, text: str) -> list[str]:
    """The files a bots file's tables name (secrets read from files, a content rules file), as load_bots reads them:
    relative to the bots file's folder. A text that does not parse names none."""
    try:
        tables = _tables(text, settings.bots_file)
    except SettingsError:
        return []
    folder = Path(settings.bots_file).parent
    bot_tables = [table for table in tables.values() if isinstance(table, dict)]
    routes = [r for table in bot_tables if isinstance(table.get("routes"), list) for r in table["routes"]]
    return [
        str(folder / value)
        for table in bot_tables + [r for r in routes if isinstance(r, dict)]
        for key, value in table.items()
        if key.endswith("_file") and isinstance(value, str) and value
    ]


def keep_last_good(folder: Path, text: str) -> None:
    """Make `text` (a bots file that loaded) the last good copy in `folder`, for the replica's other processes."""
    fresh = (folder / LAST_GOOD_COPY).with_suffix(f".{os.getpid()}")
    fresh.write_text(text, encoding="utf-8")
    fresh.replace(folder / LAST_GOOD_COPY)  # atomic: another process never reads half a copy


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"BOTS_FILE cannot be read ({path}: {exc.strerror})") from None
    except UnicodeDecodeError:
        raise SettingsError(f"BOTS_FILE is not UTF-8 text ({path})") from None


def _tables(text: str, path: str) -> dict:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"BOTS_FILE is not valid TOML ({path}: {exc})") from None
    unknown = sorted(set(document) - {"bots"})
    if unknown:
        raise SettingsError(f"BOTS_FILE has tables other than [bots.<name>]: {', '.join(unknown)}")
    bots = document.get("bots", {})
    if not isinstance(bots, dict):
        raise SettingsError("BOTS_FILE: bots must be tables ([bots.<name>])")
    return bots


class _Found(list):
    """A table's problems, and the settings they concern (not reported again as missing)."""

    def __init__(self):
        super().__init__()
        self.fields: set[str] = set()

    def add(self, field: str, problem: str) -> None:
        self.append(problem)
        self.fields.add(field)


def _values(table: dict, where: str, folder: Path) -> tuple[dict, _Found]:
    """A bot table's settings as Settings fields (secrets read from their files), and its problems."""
    values: dict = {}
    problems = _Found()
    for key, value in table.items():
        if key in PER_BOT_FIELDS and key.endswith("_file"):  # a setting naming a file (not a secret read from one)
            if not isinstance(value, str) or not value:
                problems.add(key, f"{where}: {key} must be a file path")
            else:
                values[key] = str(folder / value)  # relative to the bots file's folder; an absolute path stays
            continue
        from_file = key.endswith("_file")
        name = ALIASES.get(key.removesuffix("_file"), key.removesuffix("_file"))
        if name not in PER_BOT_FIELDS or (from_file and name not in _FROM_FILE):
            problems.append(f"{where}: unknown key {key!r}")
        elif name in values:
            problems.add(name, f"{where}: {key!r} sets {_key(name)!r} a second time")
        elif from_file:
            secret, problem = _secret_from(value, folder)
            if problem:
                problems.add(name, f"{where}: {key} {problem}")
            else:
                values[name] = secret
        elif (parsed := _typed(value, _TYPES[name])) is None:
            problems.add(name, f"{where}: {key} must be {_KINDS[_TYPES[name]]}")
        else:
            values[name] = parsed
    return values, problems


def _webhooks(table, where: str, folder: Path, problems: list[str]) -> str:
    """A bot's [bots.<name>.webhooks] table (`name = "<url>"`, or `name_file = "<path>"` of a file holding it) as the
    JSON object WECOM_WEBHOOKS holds; its problems added, one line each naming bot and webhook."""
    if not isinstance(table, dict):
        problems.append(f"{where}: webhooks must be a table ([bots.<name>.webhooks])")
        return ""
    urls = {}
    for key, value in table.items():
        name = key.removesuffix("_file")
        url, problem = _secret_from(value, folder) if key.endswith("_file") else (value, "")
        if problem:
            problems.append(f"{where}: webhooks.{key} {problem}")
        elif not isinstance(url, str) or not url:
            problems.append(f"{where}: webhooks.{key} must be a group robot's webhook URL")
        elif name in urls:
            problems.append(f"{where}: webhooks.{key} names {name!r} a second time")
        else:
            urls[name] = url
    return json.dumps(urls)


def _secret_from(path, folder: Path) -> tuple[str, str]:
    """(the secret in the file at `path`, relative to the bots file's folder; or "" and why it cannot be read)."""
    if not isinstance(path, str) or not path:
        return "", "must be a file path"
    try:
        return (folder / path).read_text(encoding="utf-8").strip(), ""  # an absolute path stays as it is
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        return "", f"cannot be read ({path}: {reason})"


_KINDS = {"str": "a string", "int": "a whole number", "float": "a number", "bool": "true or false"}


def _typed(value, kind: str):
    """`value` as the field's type, or None when TOML gave something else (a bool is not a number here)."""
    if kind == "str":
        return value if isinstance(value, str) else None
    if kind == "bool":
        return value if isinstance(value, bool) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if kind == "int":
        return value if isinstance(value, int) else None
    return float(value)


def _key(field: str) -> str:
    """How a setting is spelled in a bot's table."""
    return _KEY_OF.get(field, field)


def _in_file_terms(problem: str) -> str:
    """A settings problem ("DIFY_API_KEY is required ...") in the bot table's terms ("dify_api_key is ...")."""
    variable, _, rest = problem.partition(" ")
    field = variable.lower()
    if field in PER_BOT_FIELDS:
        return f"{_key(field)} {rest}"
    return problem  # a deployment-wide setting, e.g. DATABASE_URL that this bot's AUTH_MODE needs


# A bot's own WeCom credentials: two bots with one of them would answer each other's callbacks (a table that does
# not set one inherits the environment's, so two such tables would share it without a word).
_OWN_SECRETS = {"wecom_token": "token", "wecom_encoding_aes_key": "encoding_aes_key", "wecom_bot_secret": "secret"}


def shared_dify_keys(bots: tuple[BotSettings, ...]) -> list[str]:
    """One line per Dify API key that several bots use (allowed, but usually a table that forgot its own key)."""
    users: dict[tuple[str, str], list[str]] = {}
    for bot in bots:
        if bot.backend == "dify":
            users.setdefault((bot.dify.base_url, bot.dify.api_key), []).append(bot.name)
    return [
        f"bots {', '.join(names)} share one Dify app (the same dify_api_key): set dify_api_key in each bot's table "
        "if that is not meant"
        for names in users.values()
        if len(names) > 1
    ]


def _clashes(bots: list[BotSettings]) -> list[str]:
    """Two bots at one callback path (or one at a path the gateway serves itself), on one BotID, or with one WeCom
    credential."""
    problems = []
    for field, key in _OWN_SECRETS.items():
        holders: dict[str, BotSettings] = {}
        for bot in bots:
            secret = setting_in(bot, VARIABLES[field].path[1:])  # the path after "bot"
            if not secret or (field == "wecom_bot_secret") != (bot.wecom.mode == "long_connection"):
                continue
            first = holders.setdefault(secret, bot)
            if first is not bot and not (
                field == "wecom_bot_secret" and first.connection.bot_id == bot.connection.bot_id
            ):
                problems.append(  # (one BotID twice is named below)
                    f"BOTS_FILE bots.{bot.name}: {key} is bots.{first.name}'s too (a table without its "
                    f"own {key} takes the environment's): give each bot its own"
                )
    owners: dict[str, str] = {}
    bot_ids: dict[str, str] = {}
    for bot in bots:
        if bot.wecom.mode == "long_connection":  # no callback path; one connection per BotID
            if bot.connection.bot_id in bot_ids:
                problems.append(f"BOTS_FILE bots.{bot.name}: bot_id is bots.{bot_ids[bot.connection.bot_id]}'s already")
            bot_ids.setdefault(bot.connection.bot_id, bot.name)
            continue
        path = bot.wecom.callback_path.rstrip("/") or "/"
        if path in owners:
            problems.append(f"BOTS_FILE bots.{bot.name}: callback_path {path} is bots.{owners[path]}'s already")
        elif path == "/" or path.startswith(RESERVED_PATHS):
            problems.append(f"BOTS_FILE bots.{bot.name}: callback_path {path} is the gateway's own")
        else:
            owners[path] = bot.name
    return problems
