"""Lua scripts run by their SHA: the one way the gateway runs a script on Redis (streams, the connection lease,
the auth flight). Each script touches the keys of one entity only, passed in KEYS and sharing a hash tag, so a
call is one Redis Cluster slot.

A script of many arguments has its protocol named once, for both sides (`ScriptSpec`): its keys, its arguments and
the fields of the row it returns are read and written by name in Lua and in Python, never by position."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import redis

from services.replication import Replication, raise_first_error

_LUA_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_NAMED = re.compile(r"\b([KAH])\.([a-z_][a-z0-9_]*)")  # a named script's K.<key>, A.<argument> and H.<field>
_REST = re.compile(r"\bREST\b")  # and the index of its first argument past the named ones
_LUA_KEYWORDS = frozenset(
    {"and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if", "in", "local", "nil"}
    | {"not", "or", "repeat", "return", "then", "true", "until", "while"}
)


@dataclass(frozen=True)
class ScriptSpec:
    """A Lua script's protocol by name, for both sides. In its body, `K.<key>` is a key, `A.<argument>` an argument
    (`REST`: the index in ARGV of the first argument past the named ones), `H.<field>` a field of the one hash it
    reads with `redis.call('HMGET', <key>, HASH_FIELDS)` into `local h`, and `row{<field> = value, ...}` the row it
    returns (extra values may be appended), which fails the script when a field is missing. The caller passes keys
    and arguments by the same names (`LuaScript.run`) and reads the row with `fields`: a name wrong or missing on
    either side is an error at once (in Lua, when the source is made), and no order is kept in step by hand.

    The names are made positions when the source is made (`source`), so they cost the script nothing when it runs:
    a table of names built at each call added about 4 us to a poll's 10 us in Redis (its HMGET's 20 fields, most)."""

    name: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    body: str
    row: tuple[str, ...] = ()  # a table reply's leading fields
    hash_fields: tuple[str, ...] = ()  # the fields its HMGET reads
    shared: str = ""  # Lua functions shared with other scripts, put before the body

    def __post_init__(self) -> None:
        for name in (*self.keys, *self.args, *self.row, *self.hash_fields):
            if not _LUA_NAME.fullmatch(name) or name in _LUA_KEYWORDS:
                raise ValueError(f"{self.name}: {name!r} cannot be a Lua field name")
        self.source  # noqa: B018 -- made now, once: a name the spec lacks fails the import, not a call

    @cached_property
    def source(self) -> str:
        """The script as Redis runs it, every name made the position it stands for."""
        text = self._row_function() + self.shared + self.body
        text = _NAMED.sub(self._position, text)
        text = text.replace("HASH_FIELDS", ", ".join(f"'{name}'" for name in self.hash_fields))
        return _REST.sub(str(len(self.args) + 1), text)

    def _row_function(self) -> str:
        if not self.row:
            return ""
        missing = " or ".join(f"r.{name} == nil" for name in self.row)
        names = ", ".join(f"'{name}'" for name in self.row)
        return f"""
local function row(r)
  if {missing} then
    for _, name in ipairs({{{names}}}) do
      if r[name] == nil then error('{self.name}: its row has no ' .. name) end
    end
  end
  return {{{", ".join(f"r.{name}" for name in self.row)}}}
end
"""

    def _position(self, match: re.Match) -> str:
        table, name = match.groups()
        names, what, array = {
            "K": (self.keys, "key", "KEYS"),
            "A": (self.args, "argument", "ARGV"),
            "H": (self.hash_fields, "hash field", "h"),
        }[table]
        if name not in names:
            raise ValueError(f"{self.name}: no {what} named {name!r} (it has {', '.join(names)})")
        return f"{array}[{names.index(name) + 1}]"

    def key_list(self, keys: Mapping[str, str]) -> list[str]:
        return _in_order(self.name, "key", self.keys, keys)

    def arg_list(self, args: Mapping[str, object], rest: Iterable[object] = ()) -> list:
        return [*_in_order(self.name, "argument", self.args, args), *rest]

    def fields(self, reply: list) -> tuple[dict[str, object], list]:
        """A row's named fields, and the values after them."""
        return dict(zip(self.row, reply, strict=False)), reply[len(self.row) :]


def _in_order(script: str, what: str, names: tuple[str, ...], given: Mapping[str, object]) -> list:
    if len(given) != len(names) or not all(name in given for name in names):
        wrong = sorted(set(given) ^ set(names))
        raise TypeError(f"{script}: wrong {what}s {wrong} (it takes {', '.join(names)})")
    return [given[name] for name in names]


class LuaScript:
    """Runs one Lua script by its SHA (EVALSHA), loading it when Redis does not know it yet (a new server, or a
    replica just promoted: script caches are not replicated).

    Leaner than redis-py's registered Script object: on the poll path its bookkeeping cost as much CPU as the
    call itself (bench/profile_poll.py). `execute` sends the command (default: the client's pooled connections).
    With `replication`, every call is a write that must outlive a failover, named `write` (services/replication.py).
    """

    def __init__(
        self,
        client: redis.Redis,
        source: str | ScriptSpec,
        execute: Callable[..., object] | None = None,
        replication: Replication | None = None,
        write: str = "",
    ):
        self.client = client
        self.spec = source if isinstance(source, ScriptSpec) else None
        self.source = source.source if isinstance(source, ScriptSpec) else source
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        self._execute = execute or client.execute_command
        self._replication = replication
        self._write = write

    def __call__(self, keys: list[str], args: list) -> object:
        return self._sent(keys, args)[0]

    def run(self, keys: Mapping[str, str], args: Mapping[str, object], rest: Iterable[object] = ()) -> object:
        """One call of a named script (ScriptSpec), its keys and arguments by name."""
        return self(self.spec.key_list(keys), self.spec.arg_list(args, rest))

    def run_held(
        self, keys: Mapping[str, str], args: Mapping[str, object], rest: Iterable[object] = ()
    ) -> tuple[object, bool]:
        """`run`, and whether a replica holds what it wrote (services/replication.py)."""
        return self._sent(self.spec.key_list(keys), self.spec.arg_list(args, rest))

    def _sent(self, keys: list[str], args: list) -> tuple[object, bool]:
        try:
            return self._send(keys, args)
        except redis.exceptions.NoScriptError:
            self.load()
            return self._send(keys, args)

    def call_of(self, keys: Mapping[str, str], args: Mapping[str, object], rest: Iterable[object] = ()) -> tuple:
        """The (keys, args) of one call of a named script, for `run_each`."""
        return self.spec.key_list(keys), self.spec.arg_list(args, rest)

    def _send(self, keys: list[str], args: list) -> tuple[object, bool]:
        if self._replication is None:
            return self._execute(*self.command(keys, args)), True
        replies, held = self._replication.execute_held(keys[0], [self.command(keys, args)], self._write)
        raise_first_error(replies)
        return replies[0], held

    def command(self, keys: list[str], args: list) -> tuple:
        """The EVALSHA command of one call (for a pipeline)."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    def load(self) -> None:
        """Load the script (on a cluster, on every master)."""
        self.client.script_load(self.source)

    def run_each(self, calls: list[tuple[list[str], list]]) -> list:
        """One call per (keys, args), in one pipeline (on a cluster, one round trip per node); the results in
        order, each a reply or the exception that call raised."""
        if not calls:
            return []
        results = self._pipeline(calls)
        missing = [i for i, result in enumerate(results) if isinstance(result, redis.exceptions.NoScriptError)]
        if missing:
            self.load()
            for i, result in zip(missing, self._pipeline([calls[i] for i in missing]), strict=True):
                results[i] = result
        return results

    def _pipeline(self, calls: list[tuple[list[str], list]]) -> list:
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command(*self.command(keys, args))
        return pipe.execute(raise_on_error=False)
