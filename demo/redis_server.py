"""Redis of our own on private loopback ports and temporary directories (no persistence), for the end-to-end tests
and benchmarks that must stop, pause, restart or fail over Redis without disturbing anyone else's: one server, a
Sentinel set, or a Cluster. Each `url` is a REDIS_URL the gateway takes (docs/configuration.md).

A Sentinel set or a Cluster may put something in front of each of its servers (`front`: the fault campaign's proxy,
bench/faults/proxy.py): each server then announces the port in front of it as its address, so the clients the
sentinels or the cluster direct there reach it that way (on Sentinel, its replicas and the sentinels too; a Cluster's
nodes still gossip directly on their bus)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster

from demo.replicas import free_port


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except redis.RedisError:
            pass  # not up yet
        time.sleep(0.05)
    raise RuntimeError(f"{what} within {timeout:.0f}s")


class PrivateRedisServer:
    """`start()` runs it, `stop()` kills it (its data is gone), `pause()`/`resume()` freeze and thaw it. Without
    persistence, unless `persistent`: then every write is in its append-only file before it is acknowledged, so a
    `kill()` and `start()` keep everything (as a one-server deployment that must not lose open answers runs)."""

    def __init__(
        self,
        directory: Path | None = None,
        extra: tuple[str, ...] = (),
        binary: str = "redis-server",
        choose_port: Callable[[], int] = free_port,
        persistent: bool = False,
    ):
        self._choose_port = choose_port
        self.port = choose_port()
        self._started = False  # once started, it keeps its port: its peers know it by that
        self.persistent = persistent
        self.extra = extra
        self.binary = binary
        self._made_dir = directory is None  # a directory of our own is removed again by stop()
        self.dir = Path(directory or tempfile.mkdtemp(prefix="private-redis-"))
        self.process: subprocess.Popen | None = None
        self.front_port = 0  # the port of what stands in front of it, which it announces (0: none)

    @property
    def log_path(self) -> Path:
        """Its own log (what a server or sentinel says of failovers, syncs and refusals), kept across restarts."""
        return self.dir / "server.log"

    @property
    def address_port(self) -> int:
        """The port its clients and peers know it by: the one in front of it, if any, else its own."""
        return self.front_port or self.port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_connect_timeout=0.2)

    def start(self) -> PrivateRedisServer:
        """Run it. A port chosen free is only known to be free until it is let go, and another process (a parallel
        test worker's server) may take it first: then our server exits at once (or, a node of a Cluster, when its
        bus port was taken), and a server starting for the first time tries another port. (A Cluster once failed
        to form so in a fresh-clone CI run: a sixth node's port answered, but not from the node.)"""
        for _ in range(5):
            self.dir.mkdir(parents=True, exist_ok=True)  # again after a stop()
            self.process = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait(self._answered_or_gone, 10, f"{self.binary} did not start on port {self.port}")
            if self.running:
                self._started = True
                return self
            if self._started:
                break
            self.port = self._choose_port()
        raise RuntimeError(f"{self.binary} could not listen on port {self.port}: another process holds it")

    def _command(self) -> list[str]:
        binary = shutil.which(self.binary) or f"/usr/bin/{self.binary}"
        command = [binary, *self.extra, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        command += ["--logfile", str(self.log_path)]
        if self.binary == "redis-server" and "--sentinel" not in self.extra:
            # a replica's first sync starts at once (not after the default 5 s wait for others)
            command += ["--save", "", "--repl-diskless-sync-delay", "0"]
            command += ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        if self.front_port and "--cluster-enabled" in self.extra:
            command += ["--cluster-announce-port", str(self.front_port)]
            command += ["--cluster-announce-bus-port", str(self.port + 10000)]
        elif self.front_port:
            command += ["--replica-announce-port", str(self.front_port)]
        return command

    def _answered_or_gone(self) -> bool:
        """Our process answers on the port (not another one that holds it), or it has exited."""
        if self.process.poll() is not None:
            return True
        with closing(self.client()) as client:
            return int(client.info("server")["process_id"]) == self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a node loss would (the data directory stays, for a restart)."""
        if self.running:
            self.resume()
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> None:
        self.kill()
        if self._made_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def replicating(self) -> bool:
        """True for a replica whose link to its master is up (its first sync done)."""
        replication = self.client().info("replication")
        return replication["role"] == "slave" and replication.get("master_link_status") == "up"

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)


# How a Sentinel set's servers should run (docs/architecture.md): a master that has lost its replicas for 10 s
# refuses writes, instead of acknowledging what a failover would then take back.
DURABLE_WRITES = ("--min-replicas-to-write", "1", "--min-replicas-max-lag", "10")


class PrivateSentinelSet:
    """A master, two replicas and three sentinels (quorum 2) watching it, with a short `down_after_ms`, so a
    killed master fails over in a few seconds. `sentinel_password` makes the sentinels require one. The servers run
    as a deployment should (DURABLE_WRITES). `front(server)`, if given, puts something in front of each server and
    returns its port: everyone reaches the server that way, its replicas and the sentinels included."""

    def __init__(
        self,
        service_name: str = "gateway",
        down_after_ms: int = 1000,
        sentinel_password: str = "",
        front: Callable[[PrivateRedisServer], int] | None = None,
    ):
        self.service_name = service_name
        self.down_after_ms = down_after_ms
        self.sentinel_password = sentinel_password
        self.root = Path(tempfile.mkdtemp(prefix="private-sentinel-"))
        self.master = PrivateRedisServer(self.root / "master", extra=DURABLE_WRITES)
        self.replicas = [PrivateRedisServer(self.root / f"replica{i}") for i in range(2)]
        self.sentinels: list[PrivateRedisServer] = []
        for server in self.servers if front is not None else ():
            server.front_port = front(server)

    @property
    def servers(self) -> list[PrivateRedisServer]:
        return [self.master, *self.replicas]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service_name}"

    def start(self) -> PrivateSentinelSet:
        self.master.start()
        for replica in self.replicas:
            replica.extra = (*DURABLE_WRITES, "--replicaof", "127.0.0.1", str(self.master.address_port))
            replica.start()
        for i in range(3):
            directory = self.root / f"sentinel{i}"
            directory.mkdir()
            lines = [
                f"sentinel monitor {self.service_name} 127.0.0.1 {self.master.address_port} 2",
                f"sentinel down-after-milliseconds {self.service_name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.service_name} {max(3000, 3 * self.down_after_ms)}",
                f"sentinel parallel-syncs {self.service_name} 2",
            ]
            if self.sentinel_password:
                lines.append(f"requirepass {self.sentinel_password}")
            (directory / "sentinel.conf").write_text("\n".join(lines) + "\n")
            sentinel = PrivateRedisServer(directory, extra=(str(directory / "sentinel.conf"), "--sentinel"))
            self.sentinels.append(sentinel)
            self._start_sentinel(sentinel)
        _wait(self._fully_watched, 30, "the sentinels did not see the master's replicas and each other")
        _wait(lambda: all(r.replicating() for r in self.replicas), 30, "the replicas did not sync")
        return self

    def _start_sentinel(self, sentinel: PrivateRedisServer) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        command = [binary, *sentinel.extra, "--port", str(sentinel.port), "--bind", "127.0.0.1"]
        command += ["--logfile", str(sentinel.log_path)]
        sentinel.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: self.sentinel_client(sentinel).ping(), 10, "a sentinel did not start")

    def restart_sentinel(self, sentinel: PrivateRedisServer) -> None:
        """Start a killed sentinel again (its configuration file kept what it knew)."""
        self._start_sentinel(sentinel)

    def sentinel_client(self, sentinel: PrivateRedisServer) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=sentinel.port,
            password=self.sentinel_password or None,
            decode_responses=True,
            socket_connect_timeout=0.2,
            socket_timeout=1,
        )

    def _fully_watched(self) -> bool:
        for sentinel in self.sentinels:
            info = self.sentinel_client(sentinel).sentinel_master(self.service_name)
            if int(info["num-slaves"]) < 2 or int(info["num-other-sentinels"]) < 2:
                return False
        return True

    def master_address(self) -> tuple[str, int]:
        """The master as the sentinels see it now."""
        for sentinel in self.sentinels:
            try:
                return self.sentinel_client(sentinel).sentinel_get_master_addr_by_name(self.service_name)
            except redis.RedisError:
                continue
        raise RuntimeError("no sentinel answers")

    def current_master(self) -> PrivateRedisServer:
        _, port = self.master_address()
        return next(server for server in self.servers if server.address_port == int(port))

    def kill_master(self) -> PrivateRedisServer:
        """SIGKILL the current master; returns it (for `restart`)."""
        master = self.current_master()
        master.kill()
        return master

    def wait_for_failover(self, old: PrivateRedisServer, timeout: float = 30) -> PrivateRedisServer:
        """Wait until the sentinels name another master, and it takes writes."""
        _wait(lambda: int(self.master_address()[1]) != old.address_port, timeout, "no failover")
        master = self.current_master()
        _wait(lambda: master.client().set("failover-probe", "1", ex=5), timeout, "the new master took no writes")
        return master

    def restart(self, server: PrivateRedisServer) -> None:
        """Start a killed server again, as a replica of the current master (as a deployment's start-up script
        does: a master restarted empty and on its own would take clients a stale sentinel still points at, and its
        empty data set, until the sentinels demote it); waits until it is in sync."""
        host, port = self.master_address()
        server.extra = (*DURABLE_WRITES, "--replicaof", host, str(port))
        server.start()
        _wait(server.replicating, 60, "the restarted server did not become a replica in sync")

    def flush(self) -> None:
        self.current_master().client().flushall()

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 above it) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _probe_for(key: str) -> str:
    """Another key in `key`'s slot: braced around the part that `key`'s slot is computed from."""
    start = key.find("{")
    end = key.find("}", start + 1)
    tag = key[start + 1 : end] if start >= 0 and end > start + 1 else key
    return f"{{{tag}}}:failover-probe"


class PrivateRedisCluster:
    """A Redis Cluster of three masters, each with one replica (`redis-cli --cluster create`), and a short node
    timeout, so a killed master fails over in a few seconds. `front(node)`, if given, puts something in front of
    each node and returns its port: clients, and a replica's link to its master, reach the node that way."""

    def __init__(self, node_timeout_ms: int = 2000, front: Callable[[PrivateRedisServer], int] | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="private-cluster-"))
        options = ("--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms))
        self.nodes = [PrivateRedisServer(self.root / f"node{i}", options, choose_port=_cluster_port) for i in range(6)]
        for node in self.nodes if front is not None else ():
            node.front_port = front(node)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.address_port}" for node in self.nodes[:3])

    def start(self) -> PrivateRedisCluster:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        addresses = [f"127.0.0.1:{node.address_port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        _wait(self.healthy, 30, "the cluster did not become healthy")
        return self

    def whole(self) -> bool:
        """Every running node sees every slot served (`cluster_state:ok`): until then, one that does not answers
        every command with CLUSTERDOWN, whichever slot it is for."""
        for node in self.nodes:
            if node.running:
                with closing(node.client()) as client:
                    if client.execute_command("CLUSTER INFO")["cluster_state"] != "ok":
                        return False
        return True

    def healthy(self) -> bool:
        if not self.whole():
            return False
        client = self.client()
        try:
            replicas = client.get_replicas()
            if len(client.get_primaries()) != 3 or len(replicas) != 3:
                return False
        finally:
            client.close()
        ports = {replica.port for replica in replicas}
        return all(node.replicating() for node in self.nodes if node.address_port in ports)

    def client(self) -> RedisCluster:
        return RedisCluster(
            startup_nodes=[ClusterNode("127.0.0.1", node.port) for node in self.nodes if node.running],
            decode_responses=True,
            socket_connect_timeout=0.5,
        )

    def node_of(self, key: str) -> PrivateRedisServer:
        """The master that holds `key`'s slot now."""
        client = self.client()
        try:
            port = client.get_node_from_key(key).port
        finally:
            client.close()
        return next(node for node in self.nodes if node.address_port == port)

    def kill_master_of(self, key: str) -> PrivateRedisServer:
        master = self.node_of(key)
        master.kill()
        return master

    def wait_for_failover(self, key: str, old: PrivateRedisServer, timeout: float = 30) -> PrivateRedisServer:
        """Wait until another node holds `key`'s slot as a master and takes writes there, and every running node
        knows the cluster is whole again (a node that still counts the slot as lost refuses the commands for its own
        slots too: a message's admission, in another shard, failed so after the failover had been waited for)."""

        def moved() -> bool:
            client = self.client()
            try:
                return client.get_node_from_key(key).port != old.address_port and client.set(_probe_for(key), "1", ex=5)
            finally:
                client.close()

        _wait(moved, timeout, "no failover")
        _wait(self.whole, timeout, "the cluster did not become whole after its failover")
        return self.node_of(key)

    def restart(self, node: PrivateRedisServer) -> None:
        """Start a killed node again; it rejoins as a replica of the master that replaced it."""
        node.start()
        _wait(self.healthy, 30, "the cluster did not heal")

    def flush(self) -> None:
        client = self.client()
        try:
            for node in client.get_primaries():
                client.get_redis_connection(node).flushall()
        finally:
            client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)
