"""Which gunicorn worker class and counts serve polls fastest while stream threads run (BENCHMARKS.md §4).

Runs bench.poll_load's measurement for each configuration, one after another on the same machine, and prints a
markdown table of the medians.

    python -m bench.gunicorn_matrix --seconds 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json

from bench import harness
from bench.poll_load import measure

# The worker classes gunicorn.conf.py accepts (gevent is not shipped; BENCHMARKS.md §4 keeps its earlier figures).
CONFIGS = [("gthread", 2, 16), ("gthread", 2, 4), ("gthread", 4, 8), ("sync", 4, 1)]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--live", type=int, default=50)
    parser.add_argument("--finished", type=int, default=50)
    parser.add_argument("--deltas-per-second", type=float, default=10.0, help="of each live stream, meanwhile")
    parser.add_argument("--json", help="also write the rows to this file")
    options = parser.parse_args(argv)
    env = harness.start_environment()
    rows = []
    try:
        for worker_class, workers, threads in CONFIGS:
            row = measure(
                env,
                workers,
                threads,
                worker_class,
                options.seconds,
                options.rate,
                options.live,
                options.finished,
                32,
                options.deltas_per_second,
                options.rounds,
                floor=False,
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        env.close()
    print(f"\nMachine: {harness.machine()}\n")
    print(
        f"| worker class | workers | threads | polls/s | ceiling req/s | ratio | p50 / p99 ms at {options.rate:.0f}/s "
        "| errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['worker_class']} | {row['workers']} | {row['threads']} | {row['polls_per_s']} | "
            f"{row['ceiling_per_s']} | {row['ratio']} | {row['p50_ms']} / {row['p99_ms']} | {row['errors']} |"
        )
    if options.json:
        with open(options.json, "w") as out:
            json.dump(rows, out, indent=2)
    return rows


if __name__ == "__main__":
    main()
