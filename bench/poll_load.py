"""Poll throughput and latency against the framework's ceiling (BENCHMARKS.md §1).

Starts the gateway under gunicorn with the real Redis (a private redis-server) and the Dify stand-in, opens
`--live` streams that keep streaming through the run (their worker threads compete with the polls) and
`--finished` ones, then:

1. wrk, closed loop: the most polls/s the gateway serves, rotating through signed polls of those streams;
2. the same wrk run against a bare Flask app returning a constant, same gunicorn settings: the ceiling; and
   against the gateway's callback route (in front of Flask) returning a constant: the route's own ceiling;
3. the same against one Redis round trip on that route (`bench/bare_app.py`): the floor of any poll;
4. the same against the protocol floor: that round trip plus what WeCom's protocol forces on every poll (check
   the signature, decrypt, encrypt and sign a constant reply), and nothing of the gateway's own;
5. an open-loop run at `--rate` polls/s: p50/p99 latency measured from each poll's scheduled send time.

    python -m bench.poll_load --seconds 15 --rate 500
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench import harness
from demo import dify_standin as d

FLOORS = ("route", "floor", "protocol_floor")  # the reference apps beside the ceiling, in bench/bare_app.py


def open_streams(
    env: harness.Environment, url: str, live: int, finished: int, live_seconds: float, deltas_per_second: float
) -> tuple[list[str], list[str]]:
    """Start `live` answers that stream for `live_seconds`, and `finished` ones that are complete."""
    sim = env.simulator(url, poll_interval=0.05)
    pieces = max(1, int(live_seconds * deltas_per_second))
    env.dify.script(d.answer("delta " * pieces, pieces=pieces, delay=1 / deltas_per_second), match="live", times=None)
    env.dify.script(d.answer("A finished answer of moderate length. " * 20), match="finished", times=None)
    live_ids = [sim.send(sim.text_message("live", userid=f"live{i}"))["stream"]["id"] for i in range(live)]
    finished_ids = []
    for i in range(finished):
        first = sim.send(sim.text_message("finished", userid=f"done{i}"))
        finished_ids.append(sim.follow(first, userid=f"done{i}").stream_id)
    sim.close()
    return live_ids, finished_ids


def measure(
    env: harness.Environment,
    workers: int,
    threads: int,
    worker_class: str,
    seconds: int,
    rate: float,
    live: int,
    finished: int,
    connections: int,
    deltas_per_second: float = 1.0,
    rounds: int = 3,
    floor: bool = True,
) -> dict:
    """Measure one gunicorn configuration in `rounds` alternating rounds (this machine is shared and noisy) and
    return the medians, with every sample kept.

    Each round measures the ceiling (bare Flask) first, on a quiet machine, then (with `floor`) the callback route's
    constant, one Redis round trip on it and the protocol floor, then the gateway, whose live streams write
    `deltas_per_second` each in the background meanwhile.
    """
    extra = {"GUNICORN_THREADS": str(threads), "GUNICORN_WORKER_CLASS": worker_class}
    name = f"{worker_class}-{workers}x{threads}"
    sim = env.simulator("http://unused")
    samples: dict[str, list] = {key: [] for key in ("ceiling", *FLOORS, "ours", "ratio", "p50", "p99", "errors")}

    def reference(app: str, label: str) -> harness.LoadResult:
        replica = env.start_gateway(f"{label}-{name}-{round_number}", workers=workers, app=app, **extra)
        try:
            return harness.wrk(replica.url, harness.signed_polls(sim, ["x"], 100), seconds, connections)
        finally:
            env.stop_gateway(replica)

    try:
        for round_number in range(rounds):
            ceiling = reference("bench.bare_app:create_app()", "bare")
            references = [ceiling]
            if floor:
                for kind in FLOORS:
                    references.append(reference(f"bench.bare_app:create_{kind}_app()", kind))
                    samples[kind].append(round(references[-1].rate, 1))
            gateway = env.start_gateway(f"gateway-{name}-{round_number}", workers=workers, **extra)
            try:
                live_ids, finished_ids = open_streams(
                    env, gateway.url, live, finished, 2 * seconds + 30, deltas_per_second
                )
                ids = live_ids + finished_ids
                ours = harness.wrk(gateway.url, harness.signed_polls(sim, ids, 4000), seconds, connections)
                latency = harness.open_loop(
                    "127.0.0.1", gateway.port, harness.signed_polls(sim, ids, 4000), rate, seconds
                )
            finally:
                env.stop_gateway(gateway)
            samples["ceiling"].append(round(ceiling.rate, 1))
            samples["ours"].append(round(ours.rate, 1))
            samples["ratio"].append(round(ours.rate / ceiling.rate, 3))
            samples["p50"].append(round(latency.percentile(50), 2))
            samples["p99"].append(round(latency.percentile(99), 2))
            samples["errors"].append(ours.errors + latency.errors + sum(run.errors for run in references))
    finally:
        sim.close()
    return {
        "worker_class": worker_class,
        "workers": workers,
        "threads": threads,
        "rounds": rounds,
        "seconds_per_run": seconds,
        "live_streams": live,
        "live_deltas_per_s": deltas_per_second,
        "finished_streams": finished,
        "connections": connections,
        "fixed_rate": rate,
        "polls_per_s": statistics.median(samples["ours"]),
        "ceiling_per_s": statistics.median(samples["ceiling"]),
        "ratio": statistics.median(samples["ratio"]),
        **_floor_figures(samples),
        "p50_ms": statistics.median(samples["p50"]),
        "p99_ms": statistics.median(samples["p99"]),
        "errors": sum(samples["errors"]),
        "samples": samples,
    }


def _floor_figures(samples: dict[str, list]) -> dict:
    """Each floor's polls/s, its ratio to the ceiling, and ours to it (medians of the per-round ratios)."""
    figures = {}
    for kind in FLOORS:
        if not samples[kind]:
            continue
        rounds = list(zip(samples["ceiling"], samples[kind], samples["ours"], strict=True))
        figures[f"{kind}_per_s"] = statistics.median(samples[kind])
        figures[f"{kind}_ratio"] = statistics.median(round(f / c, 3) for c, f, _ in rounds)
        figures[f"ratio_to_{kind}"] = statistics.median(round(o / f, 3) for _, f, o in rounds)
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--live", type=int, default=50)
    parser.add_argument("--finished", type=int, default=50)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--deltas-per-second", type=float, default=1.0, help="of each live stream, meanwhile")
    parser.add_argument("--rounds", type=int, default=3)
    harness.add_gunicorn_arguments(parser)
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    env = harness.start_environment()
    started = time.time()
    try:
        result = measure(
            env,
            options.workers,
            options.threads,
            options.worker_class,
            options.seconds,
            options.rate,
            options.live,
            options.finished,
            options.connections,
            options.deltas_per_second,
            options.rounds,
        )
    finally:
        env.close()
    result.update({"machine": harness.machine(), "took_s": round(time.time() - started, 1)})
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
