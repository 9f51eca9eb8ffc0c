"""What one poll's script costs Redis: the server's own time per EVALSHA (INFO commandstats), on a private
redis-server, polling streams that each hold an answer of 300 bytes, and the client's wall time per poll beside it.
Run it on two commits to compare a change to scripts.POLL (the named protocols of services/lua.py were measured so).

    python -m bench.poll_script_cost --streams 200 --rounds 50
"""

from __future__ import annotations

import argparse
import time

from bench import harness
from demo.redis_server import PrivateRedisServer
from services.keys import Keys
from services.streams.poll_path import PollPath
from services.streams.store import AppendRequest, StreamStore


def measure(streams: int, rounds: int) -> dict:
    server = PrivateRedisServer().start()
    try:
        client = server.client()
        store = StreamStore(client, Keys("bench:"), 3600, lease_seconds=60, rate_limit=0)
        for i in range(streams):
            store.create(f"s{i}", f"m{i}", "A", "bot", f"u{i}", {"userid": f"u{i}"})
            store.append_many([AppendRequest(f"s{i}", "A", ["hello " * 50], 0, {})])
        path = PollPath(store)
        for i in range(streams):  # the script is loaded, the text folded: what is left is a steady poll's work
            path.poll(f"s{i}", 330, 20000, "orphan", "A")
        client.config_resetstat()
        started = time.perf_counter()
        for _ in range(rounds):
            for i in range(streams):
                path.poll(f"s{i}", 330, 20000, "orphan", "A")
        wall = time.perf_counter() - started
        stats = client.info("commandstats")["cmdstat_evalsha"]
        path.close()
        return {
            "polls": stats["calls"],
            "redis_us_per_poll": round(stats["usec_per_call"], 2),
            "client_us_per_poll": round(wall / stats["calls"] * 1e6, 1),
            "machine": harness.machine(),
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--json", help="also write the result here")
    options = parser.parse_args()
    harness.report(measure(options.streams, options.rounds), options.json)


if __name__ == "__main__":
    main()
