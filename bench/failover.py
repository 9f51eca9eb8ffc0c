"""Redis master failovers under running answers (BENCHMARKS.md §7), on a Sentinel set and on a Cluster.

Two gateway replicas (gunicorn) share the topology. Each failover: `--answers` answers stream (about `--answer-
seconds` long), each polled about once a second like WeCom, spread over both replicas; a probe polls one of them
every 0.1 s. Once every answer has begun, the master is killed (on a Cluster, the master of the probed answer's
slot). Measured: the time from the kill to the probe's first successful poll, the polls that failed meanwhile
(WeCom polls again after a failed one), and the answers lost (a user who got neither the whole answer in the
bubble nor the rest of it through response_url). The killed node is restarted (it comes back as a replica) before
the next failover.

    python -m bench.failover --failovers 5
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from bench import harness
from demo import dify_standin as d
from demo.redis_server import PrivateRedisCluster, PrivateSentinelSet
from demo.wecom_simulator import WeComSimulator
from services.keys import Keys
from services.redis_conn import connect_redis

KEYS = Keys()


class Follower:
    """Polls one answer about once a second over the replicas until its bubble finishes, counting failed polls."""

    def __init__(self, sim: WeComSimulator, first: dict, interval: float):
        self.sim = sim
        self.stream = first["stream"]
        self.interval = interval
        self.failed_at: list[float] = []
        self.succeeded_at: list[float] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 300
        while not self.stream["finish"] and time.monotonic() < deadline:
            time.sleep(self.interval)
            try:
                reply = self.sim.send(self.sim.poll_message(self.stream["id"]))
            except Exception:  # noqa: BLE001 - a 503 or a refused connection: WeCom polls again
                self.failed_at.append(time.monotonic())
                continue
            self.succeeded_at.append(time.monotonic())
            self.stream = reply["stream"]


def one_failover(env, topology, kind: str, gateways, options, number: int) -> dict:
    full = "".join(f"第 {i} 句。" for i in range(options.deltas))
    env.dify.script(d.answer(full, pieces=options.deltas, delay=options.answer_seconds / options.deltas), times=None)
    sim = env.simulator([g.url for g in gateways], poll_interval=1.0)
    payloads = [sim.text_message("failover", userid=f"f{number}-{i}") for i in range(options.answers)]
    firsts = [sim.send(payload) for payload in payloads]
    followers = [Follower(sim, first, 1.0) for first in firsts]
    probe = Follower(sim, firsts[0], 0.1)
    client = connect_redis(topology.url)
    try:
        deadline = time.monotonic() + 20
        while not all(client.llen(KEYS.stream_chunks(f["stream"]["id"])) for f in firsts):
            if time.monotonic() > deadline:
                raise RuntimeError("the answers did not begin")
            time.sleep(0.05)
    finally:
        client.close()
    for follower in [*followers, probe]:
        follower.thread.start()
    killed_at = time.monotonic()
    if kind == "sentinel":
        killed = topology.kill_master()
    else:
        killed = topology.kill_master_of(KEYS.stream(firsts[0]["stream"]["id"]))
    for follower in [*followers, probe]:
        follower.thread.join()
    recovered = [t for t in probe.succeeded_at if t > killed_at]
    lost = 0
    for follower, payload in zip(followers, payloads, strict=True):
        if follower.stream["content"] == full:
            continue
        message = sim.inbox.wait_for(payload["response_url"], timeout=20)
        if message is None or not message["markdown"]["content"].rstrip().endswith(full[-20:]):
            lost += 1
    sim.close()
    topology.restart(killed)
    return {
        "seconds_to_first_good_poll": round(recovered[0] - killed_at, 2) if recovered else None,
        "failed_polls": sum(len(f.failed_at) for f in followers),
        "probe_failed_polls": len(probe.failed_at),
        "answers": options.answers,
        "answers_whole_in_the_bubble": sum(f.stream["content"] == full for f in followers),
        "answers_lost": lost,
    }


def run_topology(env, kind: str, options) -> dict:
    topology = (PrivateSentinelSet() if kind == "sentinel" else PrivateRedisCluster()).start()
    extra = {"REDIS_URL": topology.url, "STREAM_LEASE_SECONDS": str(options.lease_seconds)}
    gateways = [env.start_gateway(f"failover-{kind}-{i}", workers=options.workers, **extra) for i in range(2)]
    try:
        failovers = [one_failover(env, topology, kind, gateways, options, n) for n in range(options.failovers)]
    finally:
        for gateway in gateways:
            env.stop_gateway(gateway)
        topology.stop()
    times = [f["seconds_to_first_good_poll"] for f in failovers if f["seconds_to_first_good_poll"] is not None]
    return {
        "failovers": len(failovers),
        "seconds_to_first_good_poll_median": statistics.median(times) if times else None,
        "seconds_to_first_good_poll_max": max(times) if times else None,
        "failed_polls": sum(f["failed_polls"] for f in failovers),
        "answers": sum(f["answers"] for f in failovers),
        "answers_whole_in_the_bubble": sum(f["answers_whole_in_the_bubble"] for f in failovers),
        "answers_lost": sum(f["answers_lost"] for f in failovers),
        "each": failovers,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--failovers", type=int, default=5, help="per topology")
    parser.add_argument("--answers", type=int, default=6)
    parser.add_argument("--deltas", type=int, default=40)
    parser.add_argument("--answer-seconds", type=float, default=12.0)
    parser.add_argument("--lease-seconds", type=int, default=15)
    parser.add_argument("--topology", choices=["sentinel", "cluster", "both"], default="both")
    harness.add_gunicorn_arguments(parser)
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    started = time.time()
    env = harness.start_environment()
    result: dict = {"lease_seconds": options.lease_seconds}
    try:
        for kind in ("sentinel", "cluster") if options.topology == "both" else (options.topology,):
            result[kind] = run_topology(env, kind, options)
    finally:
        env.close()
    result.update({"machine": harness.machine(), "took_s": round(time.time() - started, 1)})
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
