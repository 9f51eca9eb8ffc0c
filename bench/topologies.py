"""The gateway on each Redis topology, in one run (BENCHMARKS.md §7): one server, a Sentinel set (master, two
replicas, three sentinels) and a Cluster (three masters with a replica each), all on private loopback ports.

For each topology, in alternating rounds, the same gateway (gunicorn, same settings) is measured for:

1. poll throughput (wrk, closed loop) and poll latency at `--rate` polls/s (open loop), over finished streams;
2. Redis commands per poll: the masters' `total_commands_processed` over the wrk run, divided by its polls;
3. Redis commands per delta: `--streams` answers streaming `--deltas-per-second` each for `--stream-seconds`,
   not polled, the masters' commands divided by the deltas sent (appends, leases, the final state);
4. new-message latency at `--message-rate` messages/s, on Sentinel and Cluster both with the waits for a replica
   (WAIT) of the writes a failover must not lose, the msgid claim and the stream's opening among them
   (REDIS_CLAIM_WAIT_MS=200, the default; services/replication.py), and without them (0), which is their cost.

Throughput and p99 are reported as ratios to the one server's, measured in the same round.

    python -m bench.topologies --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from urllib.parse import urlencode

import psutil
import redis

from bench import harness
from bench.poll_load import open_streams
from demo import dify_standin as d
from demo.redis_server import PrivateRedisCluster, PrivateRedisServer, PrivateSentinelSet
from services.keys import Keys
from services.redis_conn import connect_redis

KEYS = Keys()

TOPOLOGIES = ("standalone", "sentinel", "cluster")


class Topology:
    """One running topology: its REDIS_URL, and the commands its masters have processed so far."""

    def __init__(self, name: str):
        self.name = name
        self.server = {
            "standalone": PrivateRedisServer,
            "sentinel": PrivateSentinelSet,
            "cluster": PrivateRedisCluster,
        }[name]().start()

    @property
    def url(self) -> str:
        return self.server.url

    def masters(self) -> list[redis.Redis]:
        if self.name == "standalone":
            return [self.server.client()]
        if self.name == "sentinel":
            return [self.server.current_master().client()]
        client = self.server.client()
        try:
            return [redis.Redis(host="127.0.0.1", port=node.port) for node in client.get_primaries()]
        finally:
            client.close()

    def processes(self) -> list[psutil.Process]:
        """Every redis-server of the topology (masters, replicas, sentinels)."""
        server = self.server
        servers = {
            "standalone": lambda: [server],
            "sentinel": lambda: [*server.servers, *server.sentinels],
            "cluster": lambda: server.nodes,
        }[self.name]()
        return [psutil.Process(s.process.pid) for s in servers if s.running]

    def cpu_seconds(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.processes())

    def commands(self) -> int:
        """Commands the masters have processed (the INFO and the probes of this count included: a handful)."""
        return sum(int(master.info("stats")["total_commands_processed"]) for master in self.masters())

    def flush(self) -> None:
        if self.name == "standalone":
            self.server.client().flushall()
        else:
            self.server.flush()

    def stop(self) -> None:
        self.server.stop()


def measure_round(env: harness.Environment, topology: Topology, options, round_number: int) -> dict:
    figures: dict = {}
    sim = env.simulator("http://unused")
    name = f"{topology.name}-{round_number}"
    extra = {"REDIS_URL": topology.url, "GUNICORN_THREADS": str(options.threads)}
    topology.flush()
    gateway = env.start_gateway(f"polls-{name}", workers=options.workers, **extra)
    try:
        _, finished = open_streams(env, gateway.url, 0, options.finished, 1, 1.0)
        polls = harness.signed_polls(sim, finished, 4000)
        before = topology.commands()
        throughput = harness.wrk(gateway.url, polls, options.seconds, options.connections)
        figures["commands_per_poll"] = round((topology.commands() - before) / max(1, throughput.requests), 2)
        cpu_before = topology.cpu_seconds()
        latency = harness.open_loop("127.0.0.1", gateway.port, polls, options.rate, options.seconds)
        figures["redis_cores_during_latency_run"] = round((topology.cpu_seconds() - cpu_before) / latency.seconds, 3)
        figures.update(
            polls_per_s=round(throughput.rate, 1),
            poll_p50_ms=round(latency.percentile(50), 2),
            poll_p99_ms=round(latency.percentile(99), 2),
            errors=throughput.errors + latency.errors,
        )
        figures["commands_per_delta"] = commands_per_delta(env, topology, gateway, options)
    finally:
        env.stop_gateway(gateway)
    waits = ["200", "0"] if topology.name != "standalone" else ["200"]
    for wait in waits:
        topology.flush()
        gateway = env.start_gateway(
            f"messages-{name}-{wait}", workers=options.workers, REDIS_CLAIM_WAIT_MS=wait, **extra
        )
        try:
            messages = []
            for i in range(int(options.message_rate * options.seconds)):
                query, body = sim.envelope(sim.text_message("hello", userid=f"user{round_number}-{i}"))
                messages.append((f"{harness.CALLBACK}?{urlencode(query)}", body))
            env.dify.script(d.answer("A short answer."), match="hello", times=None)
            opened = harness.open_loop("127.0.0.1", gateway.port, messages, options.message_rate, options.seconds)
            figures[f"new_message_wait_{wait}_p50_ms"] = round(opened.percentile(50), 2)
            figures[f"new_message_wait_{wait}_p99_ms"] = round(opened.percentile(99), 2)
            figures["errors"] += opened.errors
        finally:
            env.stop_gateway(gateway)
    sim.close()
    return figures


def commands_per_delta(env: harness.Environment, topology: Topology, gateway, options) -> float:
    """Redis commands per delta of `--streams` unpolled answers (appends, lease renewals, the final states). The
    benchmark's own status reads (a few dozen) are counted and taken back out."""
    deltas = int(options.deltas_per_second * options.stream_seconds)
    env.dify.script(d.clocked_answer(deltas, options.deltas_per_second), match="deltas", times=None)
    sim = env.simulator(gateway.url)
    before = topology.commands()
    ids = [sim.send(sim.text_message("deltas", userid=f"d{i}"))["stream"]["id"] for i in range(options.streams)]
    client = connect_redis(topology.url)
    reads = 0
    try:
        deadline = time.monotonic() + options.stream_seconds * 3 + 30
        while client.hget(KEYS.stream(ids[-1]), "status") != "done":  # the last one opened ends last
            reads += 1
            if time.monotonic() > deadline:
                raise RuntimeError("the answers did not finish")
            time.sleep(0.5)
        statuses = [client.hget(KEYS.stream(stream_id), "status") for stream_id in ids]
        reads += 1 + len(ids)
    finally:
        client.close()
        sim.close()
    if set(statuses) != {"done"}:
        raise RuntimeError(f"answers ended {set(statuses)}")
    spent = topology.commands() - before - reads - 2  # and the two INFO calls
    return round(spent / (deltas * options.streams), 3)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10, help="of each poll and new-message run")
    parser.add_argument("--rate", type=float, default=500, help="polls/s of the latency run")
    parser.add_argument("--message-rate", type=float, default=20)
    parser.add_argument("--finished", type=int, default=50)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--deltas-per-second", type=float, default=20)
    parser.add_argument("--stream-seconds", type=float, default=10)
    harness.add_gunicorn_arguments(parser)
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    started = time.time()
    env = harness.start_environment()
    topologies = [Topology(name) for name in TOPOLOGIES]
    samples: dict[str, list[dict]] = {name: [] for name in TOPOLOGIES}
    try:
        for round_number in range(options.rounds):
            for topology in topologies:
                samples[topology.name].append(measure_round(env, topology, options, round_number))
    finally:
        for topology in topologies:
            topology.stop()
        env.close()
    result = {"rounds": options.rounds, "gunicorn": f"gthread {options.workers}x{options.threads}"}
    for name in TOPOLOGIES:
        rounds = samples[name]
        summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "errors"}
        summary["errors"] = sum(r["errors"] for r in rounds)
        if name != "standalone":
            base = samples["standalone"]
            summary["polls_ratio_to_standalone"] = statistics.median(
                round(r["polls_per_s"] / b["polls_per_s"], 3) for r, b in zip(rounds, base, strict=True)
            )
            # the one server's p99 over this one's: like the throughput ratio, 1.0 is as good, lower is slower
            summary["p99_standalone_over_this"] = statistics.median(
                round(b["poll_p99_ms"] / r["poll_p99_ms"], 3) for r, b in zip(rounds, base, strict=True)
            )
        result[name] = {**summary, "samples": rounds}
    result.update({"machine": harness.machine(), "took_s": round(time.time() - started, 1)})
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
