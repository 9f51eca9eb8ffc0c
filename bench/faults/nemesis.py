"""The campaign's nemesis: one fault at a time, picked at random (seeded) at random intervals, each logged in the
history with its start and end. Replica faults: SIGKILL or SIGTERM then a restart, SIGSTOP past the stream leases
then SIGCONT. Redis faults: the master paused (SIGSTOP) for 2-15 s and, on Sentinel and Cluster, killed (a
failover) and restarted as a replica. MariaDB (the user table) stopped for 2-8 s and started again. Dify's faults
are the workload's, per message."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time

from bench.faults.history import History
from demo.mariadb_server import PrivateMariaDB
from demo.redis_server import PrivateRedisCluster, PrivateRedisServer, PrivateSentinelSet

logger = logging.getLogger(__name__)

REPLICA_FAULTS = ("replica_kill", "replica_term", "replica_stop")
DATABASE_FAULTS = ("mariadb_restart",)


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
    ):
        self.topology = topology
        self.replicas = replicas
        self.history = history
        self.rng = rng
        self.lease_seconds = lease_seconds
        self.database = database
        self.gap = gap
        standalone = isinstance(topology, PrivateRedisServer)  # one server has no failover to test
        self.kinds = [*REPLICA_FAULTS, "redis_pause", *(() if standalone else ("redis_kill_master",))]
        self.kinds += DATABASE_FAULTS if database is not None else ()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nemesis", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        """No new fault; the one under way ends (and is healed) first."""
        self.stop.set()
        self.thread.join(120)

    def _run(self) -> None:
        while not self.stop.wait(self.rng.uniform(*self.gap)):
            kind = self.rng.choice(self.kinds)
            started = time.time()
            try:
                target = getattr(self, kind)()
                self.history.add("fault", fault=kind, target=target, start=started, end=time.time())
            except Exception as exc:  # a fault that could not be applied is logged, and the run goes on
                logger.exception("fault %s failed", kind)
                self.history.add("fault", fault=kind, target="", start=started, end=time.time(), error=str(exc))

    # --- replicas ---------------------------------------------------------------------------------------------

    def _replica(self):
        index = self.rng.randrange(len(self.replicas))
        return index, self.replicas[index]

    def replica_kill(self) -> str:
        index, replica = self._replica()
        replica.kill()
        time.sleep(self.rng.uniform(1, 5))
        replica.start(timeout=60)
        return f"replica {index}"

    def replica_term(self) -> str:
        index, replica = self._replica()
        replica.stop(timeout=60)  # SIGTERM: it drains, hands its streams over, exits
        replica.start(timeout=60)
        return f"replica {index}"

    def replica_stop(self) -> str:
        index, replica = self._replica()
        replica.signal(signal.SIGSTOP)
        time.sleep(self.lease_seconds + self.rng.uniform(1, 5))
        replica.signal(signal.SIGCONT)
        return f"replica {index}"

    # --- MariaDB ------------------------------------------------------------------------------------------------

    def mariadb_restart(self) -> str:
        seconds = self.rng.uniform(2, 8)
        self.database.stop()
        time.sleep(seconds)
        self.database.start()
        return f"mariadb down for {seconds:.1f}s"

    # --- Redis --------------------------------------------------------------------------------------------------

    def _master(self) -> tuple[PrivateRedisServer, str]:
        if isinstance(self.topology, PrivateSentinelSet):
            return self.topology.current_master(), ""
        if isinstance(self.topology, PrivateRedisCluster):
            key = f"dify_stream:{{probe-{self.rng.randrange(1 << 30)}}}"
            return self.topology.node_of(key), key
        return self.topology, ""

    def redis_pause(self) -> str:
        master, _ = self._master()
        seconds = self.rng.uniform(2, 15)
        master.pause()
        try:
            time.sleep(seconds)
        finally:
            master.resume()
        self._settle()
        return f"redis :{master.port} for {seconds:.1f}s"

    def redis_kill_master(self) -> str:
        master, key = self._master()
        master.kill()
        if isinstance(self.topology, PrivateSentinelSet):
            self.topology.wait_for_failover(master, timeout=60)
        else:
            self.topology.wait_for_failover(key, master, timeout=60)
        time.sleep(self.rng.uniform(1, 5))
        self.topology.restart(master)
        return f"redis master :{master.port}"

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
