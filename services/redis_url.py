"""REDIS_URL, read into what to connect to (docs/configuration.md): one server, a Sentinel-monitored master, a
Cluster, or the demo's embedded store.

    redis://[[user]:password@]host:port[/db]              one server (rediss:// over TLS, unix:///path.sock)
    redis+sentinel://[[user]:password@]host:port[,host:port...]/<service name>[/db]     rediss+sentinel:// TLS
    redis+cluster://[[user]:password@]host:port[,host:port...]                         rediss+cluster:// TLS
    memory://                                              the demo's embedded store (demo mode only)

The password in the URL is the data nodes' (the master's, the cluster's); sentinels that need one of their own
get REDIS_SENTINEL_PASSWORD. Pure parsing, no I/O: settings validation and the client share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SERVER, SENTINEL, CLUSTER, EMBEDDED = "server", "sentinel", "cluster", "embedded"
_SCHEMES = {
    "redis": (SERVER, False),
    "rediss": (SERVER, True),
    "unix": (SERVER, False),
    "redis+sentinel": (SENTINEL, False),
    "rediss+sentinel": (SENTINEL, True),
    "redis+cluster": (CLUSTER, False),
    "rediss+cluster": (CLUSTER, True),
    "memory": (EMBEDDED, False),
}
_DEFAULT_PORTS = {SENTINEL: 26379, CLUSTER: 6379}
FORMS = "redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://"


class RedisUrlError(ValueError):
    """REDIS_URL cannot be read; the message says what is wrong (never the password)."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a REDIS_URL names. `nodes` are the sentinels (Sentinel) or the seed nodes (Cluster)."""

    kind: str
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    service_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None

    @property
    def replicated(self) -> bool:
        """Whether the topology fails over to a replica, which asynchronous replication may leave behind."""
        return self.kind in (SENTINEL, CLUSTER)


def parse_redis_url(url: str) -> RedisTarget:
    """Read a REDIS_URL.

    Raises:
        RedisUrlError: an unknown scheme, no host, a bad port, a Sentinel URL without its service name, a
            database number that is not one (or not 0 on a cluster).
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise RedisUrlError(f"must be {FORMS}")
    kind, tls = _SCHEMES[scheme.lower()]
    if kind == EMBEDDED:
        return RedisTarget(kind, tls)
    if kind == SERVER:
        return _server(scheme.lower(), rest, tls)
    location, _, path = rest.partition("/")
    path = path.split("?", 1)[0]
    userinfo, at, hosts = location.rpartition("@")
    username, password = _credentials(userinfo) if at else (None, None)
    nodes = tuple(_node(item, _DEFAULT_PORTS[kind]) for item in hosts.split(",") if item)
    if not nodes:
        raise RedisUrlError(f"names no {'sentinel' if kind == SENTINEL else 'cluster node'} (host:port[,host:port])")
    parts = [part for part in path.split("/") if part]
    if kind == SENTINEL:
        if not parts:
            raise RedisUrlError("must name the monitored master: redis+sentinel://host:port,.../<service name>[/db]")
        return RedisTarget(kind, tls, nodes, unquote(parts[0]), _db(parts[1:]), username, password)
    if _db(parts) != 0:
        raise RedisUrlError("names a database other than 0, which a Redis Cluster does not have")
    return RedisTarget(kind, tls, nodes, "", 0, username, password)


def _server(scheme: str, rest: str, tls: bool) -> RedisTarget:
    """One server's URL, checked here because redis-py would not say: a port that is not a number fails only at the
    first connection (in every worker), and a database that is not one is silently database 0."""
    parts = urlsplit(f"{scheme}://{rest}")
    query = dict(item.partition("=")[::2] for item in parts.query.split("&") if item)
    if scheme == "unix":
        if not parts.path:
            raise RedisUrlError("names no socket: unix:///path/to/redis.sock[?db=N]")
        return RedisTarget(SERVER, tls, db=_db([query["db"]] if "db" in query else []))
    host, port = _node(parts.netloc.rpartition("@")[2] or "", 6379)
    return RedisTarget(SERVER, tls, ((host, port),), db=_db([p for p in parts.path.split("/") if p]))


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _node(item: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(f"//{item.strip()}")
    try:
        port = parts.port or default_port
    except ValueError:
        raise RedisUrlError(f"has a bad port in {item.strip()!r}") from None
    if not parts.hostname:
        raise RedisUrlError(f"has an empty host in {item.strip()!r}")
    return parts.hostname, port


def _db(parts: list[str]) -> int:
    if not parts:
        return 0
    if len(parts) > 1 or not parts[0].isascii() or not parts[0].isdigit():
        raise RedisUrlError(f"has a database that is not a number: {'/'.join(parts)!r}")
    return int(parts[0])
