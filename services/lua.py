"""Lua scripts run by their SHA: the one way the gateway runs a script on Redis (streams, the connection lease,
the auth flight). Each script touches the keys of one entity only, passed in KEYS and sharing a hash tag, so a
call is one Redis Cluster slot."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import redis

from services.replication import Replication, raise_first_error


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
        source: str,
        execute: Callable[..., object] | None = None,
        replication: Replication | None = None,
        write: str = "",
    ):
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._execute = execute or client.execute_command
        self._replication = replication
        self._write = write

    def __call__(self, keys: list[str], args: list) -> object:
        try:
            return self._send(keys, args)
        except redis.exceptions.NoScriptError:
            self.load()
            return self._send(keys, args)

    def _send(self, keys: list[str], args: list) -> object:
        if self._replication is None:
            return self._execute(*self.command(keys, args))
        replies = self._replication.execute(keys[0], [self.command(keys, args)], self._write)
        raise_first_error(replies)
        return replies[0]

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
