"""The demo's embedded store behind `REDIS_URL=memory://` (demo mode only; settings refuse it elsewhere).

One checkout's processes share it: the first hosts an in-process fakeredis and serves it on a loopback port named
in `instance/embedded-redis.port`; the others (the operator commands while `make demo` runs, say) connect there.
fakeredis is a demo extra (requirements-demo.txt): the production image does not ship it.
"""

from __future__ import annotations

import atexit
import logging
import threading
from pathlib import Path

import redis

logger = logging.getLogger(__name__)

EMBEDDED_PORT_FILE = "embedded-redis.port"
# Set by the hosting process in its store, so another process attaches only to a checkout's embedded store, never
# to whatever else came to listen on a port a stale port file names (a demo killed before it could remove it).
HOST_MARKER_KEY = "embedded-store:host"


class EmbeddedStoreUnavailable(RuntimeError):
    """memory:// was asked for where the demo extras (fakeredis, lupa) are not installed."""


def connect_embedded(instance_path: Path) -> redis.Redis:
    """The demo's embedded store, shared by the processes of one checkout: the first process hosts it (an
    in-process fakeredis, also served on a loopback port named in `instance/embedded-redis.port`), and the
    others, such as `flask --app app streams list` while `make demo` runs, connect to it there.

    Raises:
        EmbeddedStoreUnavailable: fakeredis is not installed (the production image does not ship it).
    """
    port_file = instance_path / EMBEDDED_PORT_FILE
    hosted = _attach(port_file)
    if hosted is not None:
        return hosted
    try:
        import fakeredis  # the demo extras only (requirements-demo.txt)
    except ImportError:
        raise EmbeddedStoreUnavailable(
            "REDIS_URL=memory:// needs the demo extras: pip install -r requirements-demo.txt"
        ) from None
    server = fakeredis.TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    server.daemon_threads = True  # a connected CLI must not keep the demo from exiting
    threading.Thread(target=server.serve_forever, name="embedded-redis", daemon=True).start()
    port = str(server.server_address[1])
    hosted = fakeredis.FakeRedis(server=server.fake_server, decode_responses=True)
    hosted.set(HOST_MARKER_KEY, str(instance_path.resolve()))
    instance_path.mkdir(parents=True, exist_ok=True)
    port_file.write_text(port)
    atexit.register(_forget_port, port_file, port)
    logger.info("embedded store (memory://) served to this checkout's other processes on 127.0.0.1:%s", port)
    return hosted


def _attach(port_file: Path) -> redis.Redis | None:
    """A client of the embedded store another process of this checkout hosts, if it still answers."""
    try:
        port = int(port_file.read_text().strip())
    except (OSError, ValueError):
        return None
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_connect_timeout=0.5)
    try:
        ours = client.get(HOST_MARKER_KEY) == str(port_file.parent.resolve())
    except redis.RedisError:
        ours = False
    if not ours:
        client.close()
        return None
    return client


def _forget_port(port_file: Path, port: str) -> None:
    try:
        if port_file.read_text().strip() == port:
            port_file.unlink()
    except OSError:
        return
