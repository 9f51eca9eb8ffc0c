"""What it costs a poll to show only text a replica holds (services/streams/poll_path.py), on a private Sentinel set
or Cluster: the client's wall time per poll of live streams whose text grows between polls (each such poll waits for
a replica and notes what it shows), and of streams with nothing new (no wait), with the wait on and off in one run.

    python -m bench.poll_replica_wait --topology sentinel --streams 100 --rounds 30
"""

from __future__ import annotations

import argparse
import time

from bench import harness
from demo.redis_server import PrivateRedisCluster, PrivateSentinelSet
from services.keys import Keys
from services.redis_conn import connect_redis
from services.replication import Replication
from services.streams.poll_path import PollPath
from services.streams.store import AppendRequest, StreamStore

OWNER = "bench:1#1"


def _poll_path(client, prefix: str, wait_ms: int, streams: int) -> tuple[StreamStore, PollPath]:
    store = StreamStore(
        client, Keys(prefix), 3600, lease_seconds=600, rate_limit=0, durable=Replication(client, wait_ms)
    )
    for i in range(streams):
        store.create(f"s{i}", f"m{i}", OWNER, "bot", f"u{i}", {"userid": f"u{i}"})
    return store, PollPath(store)


def _round(store: StreamStore, path: PollPath, streams: int, written: int, grow: bool) -> float:
    """Seconds per poll of every stream, after a delta was appended to each (`grow`)."""
    if grow:
        store.append_many([AppendRequest(f"s{i}", OWNER, ["one more sentence. "], written, {}) for i in range(streams)])
    started = time.perf_counter()
    for i in range(streams):
        path.poll(f"s{i}", 3600, 1_000_000, "orphan", OWNER)
    return (time.perf_counter() - started) / streams


def measure(topology: str, streams: int, rounds: int, wait_ms: int) -> dict:
    server = (PrivateSentinelSet() if topology == "sentinel" else PrivateRedisCluster()).start()
    try:
        client = connect_redis(server.url)
        paths = {"off": _poll_path(client, "off:", 0, streams), "on": _poll_path(client, "on:", wait_ms, streams)}
        times = {(name, kind): [] for name in paths for kind in ("new_text", "nothing_new")}
        for written in range(rounds):  # alternated, so that both meet the same machine
            for name, (store, path) in paths.items():
                times[name, "new_text"].append(_round(store, path, streams, written, grow=True))
                times[name, "nothing_new"].append(_round(store, path, streams, written, grow=False))
        us = {key: round(harness.percentile(values, 50) * 1e6, 1) for key, values in times.items()}
        for _, path in paths.values():
            path.close()
        client.close()
        return {
            "topology": topology,
            "streams": streams,
            "rounds": rounds,
            "wait_ms": wait_ms,
            "us_per_poll_p50_of_rounds": {f"{name}/{kind}": value for (name, kind), value in us.items()},
            "new_text_on_over_off": round(us["on", "new_text"] / us["off", "new_text"], 2),
            "nothing_new_on_over_off": round(us["on", "nothing_new"] / us["off", "nothing_new"], 2),
            "machine": harness.machine(),
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", choices=["sentinel", "cluster"], default="sentinel")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--wait-ms", type=int, default=200)
    parser.add_argument("--json", help="also write the result here")
    options = parser.parse_args()
    harness.report(measure(options.topology, options.streams, options.rounds, options.wait_ms), options.json)


if __name__ == "__main__":
    main()
