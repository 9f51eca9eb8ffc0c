"""What the waits for a Redis replica cost a long-connection bot (BENCHMARKS.md §14): one gunicorn replica (2
workers) holds the bot's WebSocket on a Sentinel set (master and two replicas), healthy and then with both
replicas stopped and the master told to write on alone (min-replicas-to-write 0, as a Cluster shard without its
replica does), so that every write a failover must not lose waits REDIS_CLAIM_WAIT_MS (200 ms) for a replica
that never answers. Measured each time:

1. new-message latency: `--messages` messages delivered at `--rate` a second (each from a user of its own), from
   the delivery to the first frame WeCom receives on its req_id (p50 / p99);
2. frames: `--streams` answers of `--deltas` deltas over `--stream-seconds` at once: frames WeCom received per
   second, and a delta's delay to the frame that first shows it (p50 / p99).

With BENCH_APP_DIR set to another checkout (an earlier commit), that checkout's app is measured the same way.

    python -m bench.longconn_waits
"""

from __future__ import annotations

import argparse
import time

from bench import harness
from bench.longconn import BOT_ID, SECRET, frames_run, settings, wait_for
from demo import dify_standin as d
from demo.redis_server import PrivateSentinelSet
from demo.wecom_ws_standin import WeComWebSocketStandIn


def new_messages(env, wecom, options, label: str) -> dict:
    env.dify.script(d.answer("ok"), match=f"hello {label}", times=None)
    sent: dict[str, float] = {}
    for n in range(options.messages):
        started = time.time()
        sent[wecom.deliver_text(BOT_ID, f"hello {label} {n}", userid=f"{label}-{n}")] = started
        time.sleep(max(0.0, started + 1 / options.rate - time.time()))
    wait_for(lambda: all(wecom.frames(req_id) for req_id in sent), 60)
    latencies = [(wecom.frames(r)[0]["_received_at"] - t) * 1000 for r, t in sent.items() if wecom.frames(r)]
    return {
        "answered": len(latencies),
        "to_first_frame_p50_ms": round(harness.percentile(latencies, 50), 1),
        "to_first_frame_p99_ms": round(harness.percentile(latencies, 99), 1),
    }


def frames(env, wecom, options) -> dict:
    run = frames_run(env, wecom, options)
    return {name: run[name] for name in ("complete", "frames_per_s", "delta_to_frame_p50_ms", "delta_to_frame_p99_ms")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--deltas", type=int, default=20)
    parser.add_argument("--stream-seconds", type=float, default=5.0)
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    started = time.time()
    env = harness.start_environment()
    sentinel = PrivateSentinelSet().start()
    wecom = WeComWebSocketStandIn({BOT_ID: SECRET}, stamp_frames=True).start()
    result = {}
    try:
        env.start_gateway("waits", workers=2, REDIS_URL=sentinel.url, **settings(wecom, 10))
        assert wait_for(lambda: wecom.subscribed(BOT_ID) == 1, 30), "no holder"
        result["healthy"] = {**new_messages(env, wecom, options, "a"), **frames(env, wecom, options)}
        master = sentinel.current_master().client()
        master.config_set("min-replicas-to-write", 0)  # the master writes on alone; each WAIT then times out
        for replica in sentinel.replicas:
            replica.kill()
        time.sleep(1)
        result["no_replica"] = {**new_messages(env, wecom, options, "b"), **frames(env, wecom, options)}
    finally:
        wecom.stop()
        env.close()
        sentinel.stop()
    result.update(seconds=round(time.time() - started, 1), machine=harness.machine())
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
