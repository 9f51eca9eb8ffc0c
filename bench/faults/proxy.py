"""A TCP proxy the nemesis controls, between the gateway replicas and a server (Dify, or one Redis server): it passes
bytes both ways, and on command delays them, loses some of them (as TCP shows a lost segment: the bytes come late,
after a retransmission timeout), loses some of the server's replies (the request reaches the server and runs there,
and the connection breaks before its reply comes back: what a client sees when a link breaks after its write, and
what makes every retry of a write meet the write it repeats), or partitions the link (every open connection is cut,
and the proxy stops listening, so a new one is refused as a route without an endpoint refuses it: the client knows
its request never left, where a connection accepted and reset at once would leave it unsure). It stands in for the
network faults `tc netem` would make, without needing the replicas in a network namespace of their own.

One Redis server is reached by each replica through a link of its own (LinkGroup), so one replica can be cut off
from it alone. A Sentinel set or a Cluster tells its clients where its servers are: each server there has one link in
front of it, which it announces as its address (ServerLinks), so a fault of that link is a fault of the network
around that server: on Sentinel everyone's way to it (the gateway's, its replicas', the sentinels'), on a Cluster
the clients' and a replica's link to its master (the nodes' own bus stays direct).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable

from demo.redis_server import PrivateRedisServer

_CHUNK = 65536
# What a lost segment costs a TCP connection: Linux's least retransmission timeout, doubled each time the resend is
# lost too.
_RETRANSMISSIONS = (0.2, 0.2, 0.2, 0.4, 0.4, 0.8, 1.6)


class FaultyLink:
    """Listens on 127.0.0.1:`port` (a free one) and forwards to `target_port` (or to the port it returns when a
    connection comes: a server that may change its port before it first listens); `delay(s)`, `lose(share, rng)`,
    `partition()` and `heal()` may be called from any thread."""

    def __init__(self, target_port: int | Callable[[], int], target_host: str = "127.0.0.1"):
        self.target_host = target_host
        self._target_port = target_port if callable(target_port) else lambda: target_port
        self._reserved = _reserve_port(0)  # bound, not listening: refused, and no one else's until the link listens
        self.port = self._reserved.getsockname()[1]
        self.delay_seconds = 0.0
        self.loss_share = 0.0
        self._rng = random.Random(0)
        self.partitioned = False
        self.replies_lost = 0.0  # the share of replies lost with their connection
        self.replies_to = b""  # if set, only replies to requests carrying these bytes are lost
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._started = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, name=f"faulty-link-{self.port}", daemon=True)

    def start(self) -> FaultyLink:
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # (a link never started has only its port to give back)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._release_port()

    def delay(self, seconds: float) -> None:
        """Hold every chunk this long before passing it on (0: no delay)."""
        self.delay_seconds = seconds

    def lose(self, share: float, rng: random.Random) -> None:
        """Lose `share` of the chunks (0: none): each one lost is passed on only after TCP would have resent it."""
        self._rng, self.loss_share = rng, share

    def lose_replies(self, share: float, rng: random.Random, to: bytes = b"") -> None:
        """Until `heal()`, `share` of the replies are lost with their connection (a reset as the reply comes back):
        the request ran, unanswered. With `to`, only replies to the requests that carry it (a Lua script's SHA: one
        script's replies, so a short run reaches that script's window without every other command failing too)."""
        self._rng, self.replies_to, self.replies_lost = rng, to, share

    def partition(self) -> None:
        """Cut every open connection and refuse new ones until `heal()`."""
        self.partitioned = True
        self._loop.call_soon_threadsafe(self._cut_all)
        asyncio.run_coroutine_threadsafe(self._stop_listening(), self._loop).result(5)

    def heal(self) -> None:
        if self.partitioned:
            asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)
        self.partitioned = False
        self.replies_lost, self.replies_to = 0.0, b""
        self.delay_seconds = 0.0
        self.loss_share = 0.0

    # --- the proxy's loop ---------------------------------------------------------------------------------------

    async def _listen(self) -> None:
        sock, self._reserved = self._reserved, None
        self._server = await asyncio.start_server(self._accept, sock=sock or _reserve_port(self.port))

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            self._reserved = _reserve_port(self.port)  # refused while partitioned, as before, and still ours

    def _release_port(self) -> None:
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._listen())
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._stop_listening())
            pending = asyncio.all_tasks(self._loop)  # the links still open: ended here, not left to the collector
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    def _cut_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()  # a reset, as a partition met by a timeout or a dropped route would give
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.partitioned:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.target_host, self._target_port())
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, upstream_writer))
        asked = _Asked()
        with contextlib.suppress(asyncio.CancelledError):  # the proxy stops: the link ends here, quietly
            await asyncio.gather(
                self._pipe(reader, upstream_writer, asked),
                self._pipe(upstream_reader, writer, asked, replies=True),
                return_exceptions=True,
            )
        for end in (writer, upstream_writer):
            self._writers.discard(end)
            with contextlib.suppress(Exception):
                end.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, asked: _Asked, replies: bool = False
    ) -> None:
        try:
            while data := await reader.read(_CHUNK):
                if not replies:
                    asked.marked = asked.marked or bool(self.replies_to and self.replies_to in data)
                elif self._losing(asked):
                    writer.transport.abort()  # the reply is lost with the connection; the request has run
                    break
                else:
                    asked.marked = False
                if self.delay_seconds:
                    await asyncio.sleep(self.delay_seconds)
                if self.loss_share and self._rng.random() < self.loss_share:
                    await asyncio.sleep(self._rng.choice(_RETRANSMISSIONS))
                if self.partitioned:
                    break
                writer.write(data)
                await writer.drain()
        finally:
            if not writer.is_closing():
                with contextlib.suppress(Exception):
                    writer.write_eof()  # the other side ended: pass the end on

    def _losing(self, asked: _Asked) -> bool:
        """Whether the reply now coming back is lost."""
        if not self.replies_lost or (self.replies_to and not asked.marked):
            return False
        return self._rng.random() < self.replies_lost


def _reserve_port(port: int, tries: int = 40) -> socket.socket:
    """A socket bound to 127.0.0.1:`port` (0: a free one) and not listening: a connection to it is refused, as to a
    port where nothing listens, but no other test's server can take the port while the link is down or not started.
    Taken again once its listener closed, the port can be refused for a moment (EADDRINUSE: met once in a 10-minute
    Sentinel run, in a dify_partition): it is asked for again, every 50 ms for `tries`."""
    for _ in range(tries - 1):
        with contextlib.suppress(OSError):
            return _bound(port)
        time.sleep(0.05)
    return _bound(port)


def _bound(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


class _Asked:
    """What one connection's last request carried: whether its reply is one `lose_replies(to=...)` may lose."""

    def __init__(self):
        self.marked = False


class LinkGroup:
    """Links faulted all at once like one FaultyLink, or one alone (`links[i]`): one per replica to the same server
    (each replica's own way to one Redis server: `LinkGroup(port, count)`, one replica cut off while the others are
    fine), or one to each of several servers (the backends' links, Dify's and the OpenAI-compatible server's:
    `LinkGroup.of(...)`)."""

    def __init__(self, target_port: int, count: int):
        self.links = [FaultyLink(target_port) for _ in range(count)]

    @classmethod
    def of(cls, *links: FaultyLink) -> LinkGroup:
        group = cls(0, 0)
        group.links = list(links)
        return group

    def start(self) -> LinkGroup:
        for link in self.links:
            link.start()
        return self

    def stop(self) -> None:
        for link in self.links:
            link.stop()

    def delay(self, seconds: float) -> None:
        for link in self.links:
            link.delay(seconds)

    def lose(self, share: float, rng: random.Random) -> None:
        for link in self.links:
            link.lose(share, random.Random(rng.getrandbits(64)))

    def lose_replies(self, share: float, rng: random.Random, to: bytes = b"") -> None:
        for link in self.links:
            link.lose_replies(share, random.Random(rng.getrandbits(64)), to)

    def partition(self) -> None:
        for link in self.links:
            link.partition()

    def heal(self) -> None:
        for link in self.links:
            link.heal()


class ServerLinks:
    """One link in front of each server of a Sentinel set or a Cluster (`front`, given to the topology, makes one
    for a server and returns the port the server announces); a fault works on one of them (`pick`)."""

    def __init__(self):
        self.links: list[tuple[PrivateRedisServer, FaultyLink]] = []

    def front(self, server: PrivateRedisServer) -> int:
        link = FaultyLink(lambda: server.port).start()
        self.links.append((server, link))
        return link.port

    def pick(self, rng: random.Random) -> tuple[PrivateRedisServer, FaultyLink]:
        return rng.choice(self.links)

    def stop(self) -> None:
        for _, link in self.links:
            link.stop()
