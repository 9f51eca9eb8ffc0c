"""WeCom's long-connection mode (BENCHMARKS.md §10), against the WebSocket stand-in (demo/wecom_ws_standin.py).

1. Holder failover: `--replicas` gateway replicas (gunicorn, 2 workers each) stand by for one bot; the holder's
   replica is SIGKILLed (`--kills` times) or sent SIGTERM (`--drains` times) and replaced by a fresh replica;
   measured: from the signal to the next accepted subscription (targets: ≤ 15 s after a kill with the default
   10 s lease, ≤ 3 s without a connection after a drain).
2. Frames: `--streams` messages delivered at once, each answered by `--deltas` deltas over `--stream-seconds`;
   measured: frames WeCom received per second, frames per stream, the latency from a delta's send time (stamped
   in its text) to the frame that first shows it (p50 / p99), and Redis commands per frame.

    python -m bench.longconn --kills 10 --drains 10
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import time

from bench import harness
from demo import dify_standin as d
from demo.wecom_ws_standin import WeComWebSocketStandIn

BOT_ID, SECRET = "bench-ws-bot", "bench-ws-secret"
STAMP = re.compile(r"(\d+\.\d+);")


def settings(wecom: WeComWebSocketStandIn, lease: int) -> dict[str, str]:
    return {
        "WECOM_MODE": "long_connection",
        "WECOM_BOT_ID": BOT_ID,
        "WECOM_BOT_SECRET": SECRET,
        "WECOM_WS_URL": wecom.url,
        "WECOM_WS_LEASE_SECONDS": str(lease),
        "GUNICORN_GRACEFUL_TIMEOUT": "10",
    }


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def holder_of(env: harness.Environment, replicas: list) -> object:
    value = env.redis.client().get(f"wecom_ws:{{{BOT_ID}}}:lease") or ""
    name = value.rpartition(" ")[0].split(":")[0]
    return next(r for r in replicas if r.name == name)


def failovers(env, wecom, options, how: str, count: int, replicas: list) -> list[float]:
    """Seconds from the signal to the next accepted subscription, `count` times."""
    gaps = []
    for number in range(count):
        assert wait_for(lambda: wecom.subscribed(BOT_ID) == 1, 30), "no holder"
        before = len(wecom.subscribes)
        holder = holder_of(env, replicas)
        started = time.monotonic()
        if how == "kill":
            env.stop_gateway(holder)
        else:
            holder.signal(signal.SIGTERM)
        assert wait_for(lambda before=before: len(wecom.subscribes) > before, 60), f"no new holder after the {how}"
        gaps.append(round(wecom.subscribes[before][1] - started, 2))
        if how == "drain":
            holder.process.wait(30)
            env.replicas.remove(holder)
        replicas.remove(holder)
        replicas.append(env.start_gateway(f"{how}-{number}", workers=2, **settings(wecom, options.lease)))
    return gaps


def frames_run(env, wecom, options) -> dict:
    deltas = options.deltas
    env.dify.script(d.clocked_answer(deltas, deltas / options.stream_seconds), match="frames", times=None)
    client = env.redis.client()
    before = int(client.info("stats")["total_commands_processed"])
    calls_before = _calls(client)
    req_ids = [wecom.deliver_text(BOT_ID, f"frames {i}", userid=f"f{i}") for i in range(options.streams)]
    started = time.monotonic()
    finals = [wecom.final(req_id, timeout=options.stream_seconds * 4 + 60) for req_id in req_ids]
    took = time.monotonic() - started
    commands = int(client.info("stats")["total_commands_processed"]) - before
    calls = {name: n - calls_before.get(name, 0) for name, n in _calls(client).items()}
    frames = [wecom.frames(req_id) for req_id in req_ids]
    total = sum(len(f) for f in frames)
    latencies = []
    for stream_frames in frames:
        seen = set()
        for body in stream_frames:
            received = body.get("_received_at")
            for stamp in STAMP.findall(body["stream"]["content"]):
                if stamp not in seen and received:
                    seen.add(stamp)
                    latencies.append((received - float(stamp)) * 1000)
    return {
        "streams": options.streams,
        "deltas_per_stream": deltas,
        "complete": sum(1 for f in finals if f is not None),
        "frames": total,
        "frames_per_s": round(total / took, 1),
        "frames_per_stream": round(total / options.streams, 1),
        "delta_to_frame_p50_ms": round(harness.percentile(latencies, 50), 1),
        "delta_to_frame_p99_ms": round(harness.percentile(latencies, 99), 1),
        "redis_commands_per_frame": round(commands / max(1, total), 2),
        "per_frame_by_command": {
            name: round(n / max(1, total), 2) for name, n in sorted(calls.items(), key=lambda kv: -kv[1]) if n
        },
    }


def _calls(client) -> dict[str, int]:
    """Calls of each Redis command so far (a script's own calls counted under theirs, as Redis counts them)."""
    return {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in client.info("commandstats").items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--lease", type=int, default=10, help="WECOM_WS_LEASE_SECONDS (the default)")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--drains", type=int, default=10)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--deltas", type=int, default=40)
    parser.add_argument("--stream-seconds", type=float, default=10.0)
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    started = time.time()
    env = harness.start_environment()
    wecom = WeComWebSocketStandIn({BOT_ID: SECRET}, stamp_frames=True).start()
    try:
        replicas = [
            env.start_gateway(f"replica-{i}", workers=2, **settings(wecom, options.lease))
            for i in range(options.replicas)
        ]
        assert wait_for(lambda: wecom.subscribed(BOT_ID) == 1, 30), "no holder"
        result = {"frames": frames_run(env, wecom, options)}
        kills = failovers(env, wecom, options, "kill", options.kills, replicas)
        drains = failovers(env, wecom, options, "drain", options.drains, replicas)
    finally:
        wecom.stop()
        env.close()
    for name, gaps in (("kill", kills), ("drain", drains)):
        if gaps:
            result[f"{name}_to_new_holder_s"] = {
                "each": gaps,
                "median": round(statistics.median(gaps), 2),
                "max": max(gaps),
            }
    result.update(
        lease_s=options.lease,
        seconds=round(time.time() - started, 1),
        machine=harness.machine(),
    )
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
