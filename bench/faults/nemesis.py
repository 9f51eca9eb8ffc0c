"""The campaign's nemesis: faults picked at random (seeded) at random intervals, each logged in the history with its
start and end. A fault runs in a thread of its own, so the next may begin before it heals: faults overlap, except on
one target (one gateway replica, the Redis data path, a sentinel, MariaDB), and one gateway replica always stays up.
Replica faults: SIGKILL or SIGTERM then a restart, SIGTERM while the load still reaches the replica for 1-5 s (a
rolling restart, the Service's endpoints lagging), SIGSTOP past the stream leases then SIGCONT, and a stall shorter
than the lease (a GC pause, CPU throttling); and the replica holding the long-connection bot's WebSocket killed,
frozen past its WebSocket lease, or drained, its bubbles half shown. A node lost: a replica and a Redis server (the
one server, or a master) killed together and back 1-5 s later. The auth API down for 2-8 s. Redis faults: the master
paused (SIGSTOP) for 2-15 s; one server killed and restarted (from its append-only file: the campaign runs one
server as a deployment that must not lose open answers would); on Sentinel and Cluster the master killed (a
failover) and restarted as a replica, or a replica killed and restarted; on Sentinel, a sentinel killed and
restarted. MariaDB (the user table) stopped for 2-8 s and started again. The network (through the proxies of
bench/faults/proxy.py): the link to Dify, and to Redis (the one server; on Sentinel and Cluster one server's, master
or replica, chosen at random), cut for 2-8 s, or slowed, or losing 1-10 % of its segments, for 5-15 s, or 10-30 % of
its replies lost with their connection (the request ran), for 5-15 s; on one server, one replica's own link to Redis
cut for 2-8 s while the others reach it. WeCom's long connection: the bot's socket dropped, the acks of its frames
and its pongs lost for 5-15 s (the gateway must notice a link dead downstream), its frames acked 0.3-6 s late, the
acks of its proactive sends lost (the sends taken), or every proactive send refused (busy), for 5-15 s; in callback
mode, every response_url post answered busy (HTTP 503) for 2-10 s. Dify's own faults are the workload's, per
message."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from contextlib import closing
from functools import partial

from bench.faults.history import History
from bench.faults.proxy import FaultyLink, LinkGroup, ServerLinks
from demo import auth_standin
from demo.auth_standin import AuthStandIn
from demo.mariadb_server import PrivateMariaDB
from demo.redis_server import PrivateRedisCluster, PrivateRedisServer, PrivateSentinelSet
from demo.wecom_simulator import WeComInbox
from demo.wecom_ws_standin import WeComWebSocketStandIn

logger = logging.getLogger(__name__)

REPLICA_FAULTS = ("replica_kill", "replica_term", "replica_stop", "replica_stall", "rolling_restart")
# The same, aimed at the replica that holds the long-connection bot's WebSocket (its lease names it): a holder that
# dies, freezes or drains while its bubbles are half shown, whose next holder must send only what they did not show.
HOLDER_FAULTS = ("holder_kill", "holder_stop", "holder_drain")
# Faults of one replica's own way to a server, where it has one (LinkGroup: one Redis server).
REPLICA_LINK_FAULTS = ("replica_redis_partition",)
DATABASE_FAULTS = ("mariadb_restart",)
# Faults of a whole node: a gateway replica and a Redis server lost at once.
NODE_FAULTS = ("node_loss",)
# What each fault that is not a replica's works on: two faults on one target never run at once.
_TARGETS = {
    "redis_pause": "redis",
    "redis_crash": "redis",
    "redis_kill_master": "redis",
    "redis_kill_replica": "redis",
    "sentinel_kill": "sentinel",
    "mariadb_restart": "mariadb",
    "redis_partition": "redis",
    "redis_delay": "redis",
    "redis_loss": "redis",
    "redis_replies_lost": "redis",
    "dify_partition": "dify",
    "dify_delay": "dify",
    "dify_loss": "dify",
    "dify_replies_lost": "dify",
    "ws_drop": "wecom",
    "ws_acks_lost": "wecom",
    "ws_sends_refused": "wecom",
    "ws_ack_delay": "wecom",
    "ws_send_acks_lost": "wecom",
    "response_url_busy": "response_url",
    "auth_fault": "auth",
    "wecom_api_partition": "wecom_api",
    "wecom_api_delay": "wecom_api",
    "wecom_api_loss": "wecom_api",
    "wecom_api_replies_lost": "wecom_api",
}
# The faults of WeCom's HTTP APIs' link (the pushes' and the schedule's robots): on no user message's path.
WECOM_API_FAULTS = frozenset(kind for kind, target in _TARGETS.items() if target == "wecom_api")
# The faults of Dify's side (its link): the liveness goal is set for answers no such fault touched.
DIFY_FAULTS = frozenset(kind for kind, target in _TARGETS.items() if target == "dify")
# Whether a fault can cost a stream its replica (its lease, so that another replica takes the answer over, and may
# restart a run that had shown nothing): every kind is one or the other (the checker excuses a second Dify call only
# under the first; tests/test_fault_campaign.py holds every kind to a side).
KEEPS_LEASES = frozenset({
    "mariadb_restart", "dify_partition", "dify_delay", "dify_replies_lost", "ws_drop", "ws_acks_lost",
    "ws_sends_refused", "ws_ack_delay", "ws_send_acks_lost", "auth_fault", "response_url_busy",
    "replica_stall",  # shorter than the lease: nothing may be taken over
    *WECOM_API_FAULTS,
})  # fmt: skip
COSTS_LEASES = frozenset({
    "replica_kill", "replica_term", "replica_stop", "rolling_restart", "replica_redis_partition", "node_loss",
    "holder_kill", "holder_stop", "holder_drain",
    "redis_pause", "redis_crash", "redis_kill_master", "redis_kill_replica", "sentinel_kill",
    "redis_partition", "redis_delay", "redis_loss", "redis_replies_lost",
    "dify_loss",  # (as the checker has always counted it)
})  # fmt: skip
# Faults left out of the default mix, run only when --faults names them: each drives a window the gateway still has
# open (FAULTS.md, "Open windows"), so in the mix it would fail every run rather than find something new.
OPEN_WINDOW_FAULTS = frozenset({"ws_send_acks_lost"})
# Every kind of fault the nemesis knows (a topology runs those it has the parts for).
ALL_FAULTS = frozenset((*REPLICA_FAULTS, *HOLDER_FAULTS, *REPLICA_LINK_FAULTS, *NODE_FAULTS, *_TARGETS))
WECOM_FAULTS = ("ws_drop", "ws_acks_lost", "ws_ack_delay", "ws_send_acks_lost", "ws_sends_refused")
BUSY = -1  # WeCom's "system busy"
WS_LEASE_SECONDS = 10  # the campaign's WECOM_WS_LEASE_SECONDS (the default): a holder frozen longer is replaced
# The control group: every CALM_EVERY seconds of faults, the nemesis lets the faults under way end, waits until every
# replica is ready and CALM_SETTLE more seconds (a lease lapsing, a takeover's grace), and then starts none for
# CALM_SECONDS, in which the workload injects no Dify fault either (`calm` is set): a message there must be answered
# whole, with no note (checker.py, `control`).
CALM_EVERY, CALM_SETTLE, CALM_SECONDS = 90.0, 15.0, 40.0


def data_client(topology):
    """A client of the topology's data (the master of a Sentinel set, the Cluster, the one server)."""
    if isinstance(topology, PrivateSentinelSet):
        return topology.current_master().client()
    return topology.client()


class Nemesis:
    def __init__(
        self,
        topology,
        replicas: list,
        history: History,
        rng: random.Random,
        lease_seconds: float,
        database: PrivateMariaDB | None = None,
        gap: tuple[float, float] = (3.0, 10.0),
        unready: set[int] | None = None,
        links: dict[str, FaultyLink] | None = None,
        wecom: WeComWebSocketStandIn | None = None,
        ws_bot: str = "",
        ws_lease_key: str = "",
        inboxes: list[WeComInbox] | None = None,
        auth: AuthStandIn | None = None,
        calm_every: float = CALM_EVERY,
        only: frozenset[str] = frozenset(),
        replies_lost: float = 0.0,
        replies_to: bytes = b"",
    ):
        self.topology = topology
        self.calm_every = calm_every  # seconds of faults between control phases
        self.replies_lost = replies_lost  # the share of replies a *_replies_lost fault loses (0: 10-30 %, drawn)
        self.replies_to = replies_to  # redis_replies_lost: only replies to requests carrying these bytes (b"": all)
        self.replicas = replicas
        self.history = history
        self.rng = rng
        self.lease_seconds = lease_seconds
        self.database = database
        self.gap = gap
        self.unready = unready if unready is not None else set()  # replicas down or starting: no traffic for them
        self.links = links or {}  # "dify", "redis": the proxies in front of them (bench/faults/proxy.py)
        self.wecom, self.ws_bot = wecom, ws_bot  # the long connection's stand-in, and the bot on it
        self.ws_lease_key = ws_lease_key  # the Redis key of that bot's lease (it names its holder)
        self.inboxes = inboxes or []  # where the callback bots' response_url posts go
        self.auth = auth  # the auth API's stand-in
        self.kinds = [*REPLICA_FAULTS, *NODE_FAULTS, "redis_pause"]
        if isinstance(topology, PrivateRedisServer):
            self.kinds.append("redis_crash")
        else:
            self.kinds += ["redis_kill_master", "redis_kill_replica"]
        if isinstance(topology, PrivateSentinelSet):
            self.kinds.append("sentinel_kill")
        self.kinds += DATABASE_FAULTS if database is not None else ()
        for name in self.links:
            self.kinds += [f"{name}_partition", f"{name}_delay", f"{name}_loss", f"{name}_replies_lost"]
        self.kinds += REPLICA_LINK_FAULTS if isinstance(self.links.get("redis"), LinkGroup) else ()
        self.kinds += WECOM_FAULTS if wecom is not None else ()
        self.kinds += HOLDER_FAULTS if wecom is not None and ws_lease_key else ()
        self.kinds += ["response_url_busy"] if self.inboxes else []
        self.kinds += ["auth_fault"] if auth is not None else []
        if only:  # --faults: the nemesis aimed at these kinds alone
            self.kinds = [kind for kind in self.kinds if kind in only]
            if not self.kinds:
                raise ValueError(f"none of the faults {', '.join(sorted(only))} applies to this topology")
        else:
            self.kinds = [kind for kind in self.kinds if kind not in OPEN_WINDOW_FAULTS]
        self.stop = threading.Event()
        self.calm = threading.Event()  # a control phase: no fault anywhere (the workload reads it too)
        self.thread = threading.Thread(target=self._run, name="nemesis", daemon=True)
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._faults: list[threading.Thread] = []

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        """No new fault; those under way end (and are healed) first."""
        self.stop.set()
        self.thread.join(120)
        for fault in self._faults:
            fault.join(120)

    def _run(self) -> None:
        calm_at = time.monotonic() + self.calm_every
        while not self.stop.wait(self.rng.uniform(*self.gap)):
            if time.monotonic() >= calm_at:
                self._calm()
                calm_at = time.monotonic() + self.calm_every
                continue
            kind = self.rng.choice(self.kinds)
            target = self._claim(kind)
            if target is None:
                continue  # its target is under a fault already
            rng = random.Random(self.rng.getrandbits(64))  # the fault's own, so the schedule stays seeded
            fault = threading.Thread(target=self._apply, args=(kind, target, rng), name=f"nemesis-{kind}", daemon=True)
            self._faults.append(fault)
            fault.start()

    def _calm(self) -> None:
        """A control phase (CALM_EVERY): the faults under way end, every replica is ready, then CALM_SECONDS with
        none, recorded in the history as `calm` from its start to its end."""
        for fault in self._faults:
            fault.join(120)
        deadline = time.monotonic() + 60
        while self.unready and time.monotonic() < deadline and not self.stop.is_set():
            time.sleep(0.2)
        self.calm.set()  # no Dify fault from here: the messages sent in the settling start clean
        if self.stop.wait(CALM_SETTLE):
            self.calm.clear()
            return
        started = time.time()
        self.stop.wait(CALM_SECONDS)
        self.history.add("calm", start=started, end=time.time())
        self.calm.clear()

    def _claim(self, kind: str) -> str | None:
        """The target `kind` works on now, marked busy; None if it is busy (or it would take the last replica)."""
        holder = self._holder() if kind in HOLDER_FAULTS else None
        with self._lock:
            if kind in REPLICA_FAULTS or kind in REPLICA_LINK_FAULTS or kind in NODE_FAULTS or kind in HOLDER_FAULTS:
                free = [f"replica:{i}" for i in range(len(self.replicas)) if f"replica:{i}" not in self._busy]
                if len(free) < 2 or (kind in NODE_FAULTS and "redis" in self._busy):
                    return None
                if kind in HOLDER_FAULTS:
                    if holder is None or f"replica:{holder}" not in free:
                        return None  # no replica holds the connection now, or it is under a fault already
                    target = f"replica:{holder}"
                else:
                    target = self.rng.choice(free)
                if kind in NODE_FAULTS:
                    self._busy.add("redis")
            elif (target := _TARGETS[kind]) in self._busy:
                return None
            self._busy.add(target)
            return target

    def _apply(self, kind: str, target: str, rng: random.Random) -> None:
        started = time.time()
        try:
            what = getattr(self, kind)(target, rng)
            self.history.add("fault", fault=kind, target=what, start=started, end=time.time())
        except Exception as exc:  # a fault that could not be applied is logged, and the run goes on
            logger.exception("fault %s failed", kind)
            self.history.add("fault", fault=kind, target="", start=started, end=time.time(), error=str(exc))
        finally:
            with self._lock:
                self._busy.discard(target)
                if kind in NODE_FAULTS:
                    self._busy.discard("redis")

    # --- replicas ---------------------------------------------------------------------------------------------

    def _replica(self, target: str):
        index = int(target.split(":")[1])
        return index, self.replicas[index]

    def replica_kill(self, target: str, rng: random.Random) -> str:
        index, replica = self._replica(target)
        held = self._kill(index, replica)
        self.unready.add(index)  # its readiness probe fails within a few seconds; then it is out until ready again
        time.sleep(rng.uniform(1, 5))
        replica.start(timeout=60)
        self.unready.discard(index)
        return f"replica {index}{held}"

    def _kill(self, index: int, replica) -> str:
        """SIGKILL the replica; " (the holder)" if it held the long-connection bot's WebSocket (the checker tells a
        message its holder's death took in its intake by it). The lease is read after the kill, which it outlives, so
        that a Redis under a fault of its own delays the reading, not the kill."""
        replica.kill()
        return " (the holder)" if self._holder() == index else ""

    def replica_term(self, target: str, rng: random.Random) -> str:
        index, replica = self._replica(target)
        self.unready.add(index)  # a terminating pod leaves its Service's endpoints at once
        replica.stop(timeout=60)  # SIGTERM: it drains, hands its streams over, exits
        replica.start(timeout=60)
        self.unready.discard(index)
        return f"replica {index}"

    def replica_stop(self, target: str, rng: random.Random) -> str:
        index, replica = self._replica(target)
        replica.signal(signal.SIGSTOP)
        time.sleep(self.lease_seconds + rng.uniform(1, 5))
        replica.signal(signal.SIGCONT)
        return f"replica {index}"

    def _holder(self) -> int | None:
        """The replica that holds the long-connection bot's WebSocket now (its lease names the holding process,
        `replica-<n>:<pid>`), or None."""
        try:
            with closing(data_client(self.topology)) as client:
                lease = client.get(self.ws_lease_key)
        except Exception:  # noqa: BLE001 - Redis is under a fault of its own: no holder is known
            return None
        owner = (lease.decode() if isinstance(lease, bytes) else lease or "").split(":", 1)[0]
        number = owner.rpartition("-")[2]
        return int(number) if number.isdigit() and int(number) < len(self.replicas) else None

    def holder_kill(self, target: str, rng: random.Random) -> str:
        """The process holding the bot's WebSocket killed (SIGKILL) with its bubbles half shown: another replica
        takes the connection, and the rest of each answer goes out as a message of its own."""
        named = self.replica_kill(target, rng)
        return named if named.endswith("(the holder)") else named + " (the holder)"  # (Redis away: not read back)

    def holder_stop(self, target: str, rng: random.Random) -> str:
        """The holder frozen (SIGSTOP) past its WebSocket's lease, so that another replica takes the connection, then
        thawed: it finds its connection taken and its answers' leases lapsed."""
        index, replica = self._replica(target)
        replica.signal(signal.SIGSTOP)
        time.sleep(max(self.lease_seconds, WS_LEASE_SECONDS) + rng.uniform(1, 5))
        replica.signal(signal.SIGCONT)
        return f"replica {index} (the holder)"

    def holder_drain(self, target: str, rng: random.Random) -> str:
        """The holder drained (SIGTERM, as a rolling update does): it hands the connection over at once."""
        return self.replica_term(target, rng) + " (the holder)"

    def replica_stall(self, target: str, rng: random.Random) -> str:
        """A stall shorter than the lease (a GC pause, CPU throttling at a limit): nothing may be taken over."""
        index, replica = self._replica(target)
        seconds = rng.uniform(0.3, self.lease_seconds * 0.6)
        replica.signal(signal.SIGSTOP)
        time.sleep(seconds)
        replica.signal(signal.SIGCONT)
        return f"replica {index} stalled {seconds:.1f}s"

    def rolling_restart(self, target: str, rng: random.Random) -> str:
        """SIGTERM while the load still reaches the replica for 1-5 s, as a Service's endpoints lag a terminating
        pod: callbacks and polls keep coming to a process that drains."""
        index, replica = self._replica(target)
        lag = rng.uniform(1, 5)
        replica.signal(signal.SIGTERM)
        time.sleep(lag)
        self.unready.add(index)
        replica.stop(timeout=60)  # it exits once drained (stop only waits, and closes its log)
        replica.start(timeout=60)
        self.unready.discard(index)
        return f"replica {index}, routed to {lag:.1f}s after its SIGTERM"

    def node_loss(self, target: str, rng: random.Random) -> str:
        """A node lost (its VM gone): a gateway replica and a Redis server killed together (SIGKILL), both back 1-5 s
        later: the one server from its append-only file; on Sentinel and Cluster a master, failed over first and
        back as a replica. The answers the replica owned are taken over by the others once Redis answers again."""
        index, replica = self._replica(target)
        held = self._kill(index, replica)
        server, restart = self._lose_redis(rng)
        self.unready.add(index)
        time.sleep(rng.uniform(1, 5))
        restart()
        replica.start(timeout=60)
        self.unready.discard(index)
        return f"replica {index}{held} and redis :{server.port}"

    # --- the auth API -----------------------------------------------------------------------------------------

    def auth_fault(self, target: str, rng: random.Random) -> str:
        """The auth API down (HTTP 503) for 2-8 s: users whose token is not cached wait for it (AUTH_RETRY_SECONDS)."""
        seconds = rng.uniform(2, 8)
        self.auth.mode = auth_standin.DOWN
        time.sleep(seconds)
        self.auth.mode = auth_standin.OK
        return f"auth API down for {seconds:.1f}s"

    # --- the network ------------------------------------------------------------------------------------------

    def _partition(self, name: str, rng: random.Random) -> str:
        link, what = self._link(name, rng)
        seconds = rng.uniform(2, 8)
        self._on_link(link, seconds, lambda link: link.partition())
        return f"{what} cut off for {seconds:.1f}s"

    def _delay(self, name: str, rng: random.Random, low: float, high: float) -> str:
        link, what = self._link(name, rng)
        delay, seconds = rng.uniform(low, high), rng.uniform(5, 15)
        self._on_link(link, seconds, lambda link: link.delay(delay))
        return f"{what} {delay * 1000:.0f} ms slower for {seconds:.1f}s"

    def _loss(self, name: str, rng: random.Random) -> str:
        link, what = self._link(name, rng)
        share, seconds = rng.uniform(0.01, 0.1), rng.uniform(5, 15)
        losing = random.Random(rng.getrandbits(64))
        self._on_link(link, seconds, lambda link: link.lose(share, losing))
        return f"{what} losing {share * 100:.0f}% of its segments for {seconds:.1f}s"

    def _replies_lost(self, name: str, rng: random.Random) -> str:
        link, what = self._link(name, rng)
        share, seconds = rng.uniform(0.1, 0.3), rng.uniform(5, 15)
        share = self.replies_lost or share
        losing = random.Random(rng.getrandbits(64))
        to = self.replies_to if name == "redis" else b""
        self._on_link(link, seconds, lambda link: link.lose_replies(share, losing, to))
        which = f" to {to.decode()[:8]}…" if to else ""
        return f"{what} losing {share * 100:.0f}% of its replies{which} for {seconds:.1f}s"

    def _link(self, name: str, rng: random.Random) -> tuple[FaultyLink | LinkGroup, str]:
        """The proxied link a fault of `name` works on, and what to call it: Dify's, the one Redis server's (every
        replica's way to it), or on Sentinel and Cluster one server's, master or replica, chosen at random."""
        link = self.links[name]
        if not isinstance(link, ServerLinks):
            return link, name
        server, one = link.pick(rng)
        try:
            with closing(server.client()) as client:
                role = {"master": "master", "slave": "replica"}[client.info("replication")["role"]]
        except Exception:  # noqa: BLE001 - it is down (a fault of another kind): its link is faulted all the same
            role = "down"
        return one, f"redis :{server.port} ({role})"

    @staticmethod
    def _on_link(link: FaultyLink | LinkGroup, seconds: float, fault) -> None:
        """`fault` on the proxied `link` for `seconds`, then healed (a fault that failed half-way too)."""
        try:
            fault(link)
            time.sleep(seconds)
        finally:
            link.heal()

    def dify_loss(self, target: str, rng: random.Random) -> str:
        """1-10 % of what goes to and from Dify lost (each held until TCP would have resent it), for 5-15 s."""
        return self._loss("dify", rng)

    def redis_loss(self, target: str, rng: random.Random) -> str:
        """1-10 % of what goes to and from a Redis server lost, for 5-15 s."""
        return self._loss("redis", rng)

    def dify_replies_lost(self, target: str, rng: random.Random) -> str:
        """10-30 % of the requests reach Dify, and their connection breaks as the reply begins, for 5-15 s."""
        return self._replies_lost("dify", rng)

    def redis_replies_lost(self, target: str, rng: random.Random) -> str:
        """10-30 % of the replies of a Redis server lost with their connection, for 5-15 s (the command ran): a
        retry of a write meets the write it repeats."""
        return self._replies_lost("redis", rng)

    def dify_partition(self, target: str, rng: random.Random) -> str:
        """Every connection to Dify cut, and new ones refused, for 2-8 s."""
        return self._partition("dify", rng)

    def dify_delay(self, target: str, rng: random.Random) -> str:
        """Everything to and from Dify held 0.3-1.5 s, for 5-15 s."""
        return self._delay("dify", rng, 0.3, 1.5)

    def redis_partition(self, target: str, rng: random.Random) -> str:
        """Every connection to a Redis server cut, and new ones refused, for 2-8 s (on Sentinel, long enough for a
        master to be failed over)."""
        return self._partition("redis", rng)

    def replica_redis_partition(self, target: str, rng: random.Random) -> str:
        """One replica's connections to Redis cut, and new ones refused, for 2-8 s, while the others reach it."""
        index, _ = self._replica(target)
        seconds = rng.uniform(2, 8)
        link = self.links["redis"].links[index]
        link.partition()
        try:
            time.sleep(seconds)
        finally:
            link.heal()
        return f"replica {index} cut off from Redis for {seconds:.1f}s"

    def redis_delay(self, target: str, rng: random.Random) -> str:
        """Everything to and from a Redis server held 20-300 ms, for 5-15 s."""
        return self._delay("redis", rng, 0.02, 0.3)

    # --- WeCom's HTTP APIs (the robots the pushes and the schedule's ticks go to) -------------------------------

    def wecom_api_partition(self, target: str, rng: random.Random) -> str:
        """Every connection to WeCom's HTTP APIs cut, and new ones refused, for 2-8 s: a push then fails, unsent."""
        return self._partition("wecom_api", rng)

    def wecom_api_delay(self, target: str, rng: random.Random) -> str:
        """Everything to and from WeCom's HTTP APIs held 0.3-1.5 s, for 5-15 s."""
        return self._delay("wecom_api", rng, 0.3, 1.5)

    def wecom_api_loss(self, target: str, rng: random.Random) -> str:
        """1-10 % of what goes to and from WeCom's HTTP APIs lost, for 5-15 s."""
        return self._loss("wecom_api", rng)

    def wecom_api_replies_lost(self, target: str, rng: random.Random) -> str:
        """10-30 % of the pushes reach the robot, and their reply is lost with the connection, for 5-15 s: such a
        push is `unknown`, never sent again."""
        return self._replies_lost("wecom_api", rng)

    # --- WeCom's long connection ------------------------------------------------------------------------------

    def ws_drop(self, target: str, rng: random.Random) -> str:
        """The bot's WebSocket breaks (no event, no close frame); its holder connects again."""
        self.wecom.drop(self.ws_bot)
        time.sleep(rng.uniform(2, 5))  # the fault's time: the holder's reconnection
        return "bot's socket dropped"

    def ws_acks_lost(self, target: str, rng: random.Random) -> str:
        """Frames reach WeCom but neither their acks nor pongs come back, for 5-15 s."""
        return f"acks and pongs lost for {self._wecom_while('acks_lost', True, False, rng):.1f}s"

    def ws_ack_delay(self, target: str, rng: random.Random) -> str:
        """Every stream frame acked 0.3-6 s late (WeCom's own is about 0.3 s; past 5 s, the gateway's wait for an
        ack), for 5-15 s."""
        delay = rng.uniform(0.3, 6.0)
        return f"acks {delay:.1f}s late for {self._wecom_while('ack_delay', delay, 0.0, rng):.1f}s"

    def ws_send_acks_lost(self, target: str, rng: random.Random) -> str:
        """Every aibot_send_msg taken (its user has it) and its ack never sent back, for 5-15 s: a send whose
        fate its sender cannot know."""
        return f"proactive sends' acks lost for {self._wecom_while('send_acks_lost', True, False, rng):.1f}s"

    def ws_sends_refused(self, target: str, rng: random.Random) -> str:
        """Every aibot_send_msg refused as busy for 5-15 s."""
        return f"proactive sends refused for {self._wecom_while('busy_errcode', BUSY, 0, rng):.1f}s"

    def response_url_busy(self, target: str, rng: random.Random) -> str:
        """Every response_url post answered HTTP 503 (WeCom busy) for 2-10 s: the gateway tries a post again over
        about 15 s, so it lands once the busy spell is over."""
        seconds = rng.uniform(2, 10)
        for inbox in self.inboxes:
            inbox.busy_until = time.time() + seconds
        time.sleep(seconds)
        return f"response_url busy for {seconds:.1f}s"

    def _wecom_while(self, setting: str, faulty: object, healthy: object, rng: random.Random) -> float:
        """The WebSocket stand-in's `setting` at `faulty` for 5-15 s, then `healthy` again; the seconds it lasted."""
        seconds = rng.uniform(5, 15)
        setattr(self.wecom, setting, faulty)
        try:
            time.sleep(seconds)
        finally:
            setattr(self.wecom, setting, healthy)
        return seconds

    # --- MariaDB ------------------------------------------------------------------------------------------------

    def mariadb_restart(self, target: str, rng: random.Random) -> str:
        seconds = rng.uniform(2, 8)
        self.database.stop()
        time.sleep(seconds)
        self.database.start()
        return f"mariadb down for {seconds:.1f}s"

    # --- Redis --------------------------------------------------------------------------------------------------

    def _master(self, rng: random.Random) -> tuple[PrivateRedisServer, str]:
        if isinstance(self.topology, PrivateSentinelSet):
            return self.topology.current_master(), ""
        if isinstance(self.topology, PrivateRedisCluster):
            key = f"dify_stream:{{probe-{rng.randrange(1 << 30)}}}"
            return self.topology.node_of(key), key
        return self.topology, ""

    def redis_pause(self, target: str, rng: random.Random) -> str:
        master, _ = self._master(rng)
        seconds = rng.uniform(2, 15)
        master.pause()
        try:
            time.sleep(seconds)
        finally:
            master.resume()
        self._settle()
        return f"redis :{master.port} for {seconds:.1f}s"

    def _lose_redis(self, rng: random.Random) -> tuple[PrivateRedisServer, Callable[[], object]]:
        """SIGKILL a Redis server: the one server, or a master (once failed over); the server, and how to start it
        again (the one server from its append-only file; a master back as a replica)."""
        if isinstance(self.topology, PrivateRedisServer):
            self.topology.kill()
            return self.topology, self.topology.start
        master, key = self._master(rng)
        master.kill()
        if isinstance(self.topology, PrivateSentinelSet):
            self.topology.wait_for_failover(master, timeout=60)
        else:
            self.topology.wait_for_failover(key, master, timeout=60)
        return master, partial(self.topology.restart, master)

    def redis_kill_master(self, target: str, rng: random.Random) -> str:
        master, restart = self._lose_redis(rng)
        time.sleep(rng.uniform(1, 5))
        restart()
        return f"redis master :{master.port}"

    def redis_kill_replica(self, target: str, rng: random.Random) -> str:
        """A Redis replica lost for 2-8 s: the writes that wait for a replica wait on the others (or time out)."""
        if isinstance(self.topology, PrivateSentinelSet):
            master = self.topology.current_master()
            replicas = [server for server in self.topology.servers if server is not master and server.running]
        else:
            ports = {node.port for node in _cluster_replicas(self.topology)}  # as the nodes announce themselves
            replicas = [node for node in self.topology.nodes if node.address_port in ports and node.running]
        if not replicas:  # (a failover under way, or its node still down): recorded as a fault that did not run
            raise RuntimeError("no Redis replica is running")
        replica = rng.choice(replicas)
        replica.kill()
        time.sleep(rng.uniform(2, 8))
        self.topology.restart(replica)
        return f"redis replica :{replica.port}"

    def redis_crash(self, target: str, rng: random.Random) -> str:
        """The one server killed (SIGKILL) and started again 1-5 s later, from its append-only file."""
        server, restart = self._lose_redis(rng)
        time.sleep(rng.uniform(1, 5))
        restart()
        return f"redis :{server.port}"

    def sentinel_kill(self, target: str, rng: random.Random) -> str:
        """One of the three sentinels lost for 2-8 s (the other two still make a quorum)."""
        sentinel = rng.choice(self.topology.sentinels)
        sentinel.kill()
        time.sleep(rng.uniform(2, 8))
        self.topology.restart_sentinel(sentinel)
        return f"sentinel :{sentinel.port}"

    def _settle(self) -> None:
        """After a pause: on Sentinel or Cluster the paused master may have been failed over; wait until the
        topology takes writes again before the next fault."""
        if isinstance(self.topology, PrivateSentinelSet):
            master = self.topology.current_master()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if master.client().set("nemesis-probe", "1", ex=5):
                        break
                except Exception as exc:  # noqa: BLE001 - not yet
                    logger.debug("the topology takes no writes yet: %s", exc)
                time.sleep(0.5)
                master = self.topology.current_master()
        elif isinstance(self.topology, PrivateRedisCluster):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not self.topology.healthy():
                time.sleep(0.5)


def _cluster_replicas(cluster: PrivateRedisCluster) -> list:
    client = cluster.client()
    try:
        return client.get_replicas()
    finally:
        client.close()
