"""What a durable write costs when it waits for every replica of its master rather than for the first (BENCHMARKS.md
§25; services/replication.py), on a Sentinel set of private loopback ports (a master, two replicas, three
sentinels), in alternating rounds of one run:

1. `one`: each write waits for one replica (`WAIT 1`), as before;
2. `every`: each write waits for every replica the master has (its ROLE), as now;
3. `every, one frozen`: the same for `--frozen-seconds` with one replica SIGSTOPped: the first write waits out
   REDIS_CLAIM_WAIT_MS, the writes after it wait for the replica that answered only, until the master's ROLE is
   asked again (every 5 s), which names the frozen one again.

Each write is one msgid-claim-sized SET and its WAIT, in one round trip, from one thread; latency per write.

    python -m bench.replica_waits --rounds 3 --writes 2000 --frozen-seconds 12
"""

from __future__ import annotations

import argparse
import statistics
import time

from demo.redis_server import PrivateSentinelSet
from services.redis_conn import connect_redis
from services.replication import MSGID_CLAIM, Replication

WAIT_MS = 200
PASSWORD = "bench-sentinel"


def _writes(durable: Replication, writes: int, prefix: str, every: bool, seconds: float = 0) -> list[float]:
    """Each write's latency: `writes` of them, or as many as `seconds` take."""
    took, until = [], time.monotonic() + seconds
    for n in range(writes if not seconds else 10**9):
        if seconds and time.monotonic() >= until:
            break
        if not every:
            durable._replicas, durable._replicas_read_at = 1, time.monotonic()  # as before: WAIT 1, no ROLE
        key = f"{prefix}:{n}"
        started = time.perf_counter()
        durable.execute(key, [("SET", key, "stream-id", "NX", "EX", 900)], MSGID_CLAIM)
        took.append(time.perf_counter() - started)
    return took


def _figures(took: list[float]) -> str:
    ms = sorted(t * 1000 for t in took)
    return f"p50 {statistics.median(ms):.3f} ms, p99 {ms[int(len(ms) * 0.99)]:.3f} ms, max {ms[-1]:.1f} ms"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--frozen-seconds", type=float, default=12.0)
    options = parser.parse_args(argv)
    topology = PrivateSentinelSet(sentinel_password=PASSWORD).start()
    try:
        client = connect_redis(topology.url, sentinel_password=PASSWORD)
        durable = Replication(client, WAIT_MS, "bench")
        _writes(durable, 200, "warm", every=True)
        for round_ in range(1, options.rounds + 1):
            for name, every in (("one", False), ("every", True)):
                durable._replicas_read_at = float("-inf")  # the next write asks the master's ROLE
                _writes(durable, 1, f"sync-{name}", every)
                took = _writes(durable, options.writes, name, every)
                print(f"round {round_}, {name} (WAIT {durable._replicas}): {_figures(took)}")
            frozen = next(s for s in topology.replicas if s.running)
            durable._replicas_read_at = float("-inf")  # both replicas in sync again, as ROLE says
            _writes(durable, 1, "sync", every=True)
            frozen.pause()
            try:
                took = _writes(durable, 0, "frozen", every=True, seconds=options.frozen_seconds)
            finally:
                frozen.resume()
            waited = sum(1 for t in took if t * 1000 >= WAIT_MS)
            print(f"round {round_}, every, one frozen: {_figures(took)}; {waited} of {len(took)} waited it out")
            time.sleep(1.0)  # the frozen replica catches up
        client.close()
    finally:
        topology.stop()


if __name__ == "__main__":
    main()
