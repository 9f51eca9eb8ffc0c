"""The backends side by side in one run (BENCHMARKS.md §21): a gateway answered by Dify (its stand-in) and one
answered by an OpenAI-compatible server (its stand-in, demo/openai_standin.py), under gunicorn with the same
settings.

1. Poll throughput (wrk) in alternating rounds, while `--live` answers of each backend stream at 30 deltas/s: the
   polls of the new backend's answers as a ratio of Dify's.
2. The gateway's added latency to the first text: for `--messages` messages one after another, the time from the
   callback's POST to the answer's first text in Redis (where any replica's next poll shows it; the keyspace
   notification of its first write), against a client that reads the same server directly (the time to its first
   text). Each server holds the first text back `--first-token-ms`, as a model does; the difference of the medians
   is what the gateway adds (the callback, the stream's opening, the worker, the backend call, the first write).

    python -m bench.backends --rounds 3 --seconds 10 --messages 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import httpx
import redis

from bench import harness
from demo import dify_standin as d
from demo import openai_standin as o
from demo.openai_standin import OpenAIStandIn

MODEL = "bench-model"


def openai_settings(server: OpenAIStandIn) -> dict[str, str]:
    return {"BACKEND": "openai", "OPENAI_BASE_URL": server.base_url, "OPENAI_MODEL": MODEL}


def script_live(env: harness.Environment, server: OpenAIStandIn, seconds: float, per_second: float) -> None:
    """Answers that stream `per_second` deltas for `seconds` (`live`), and finished ones, from both servers."""
    pieces = max(1, int(seconds * per_second))
    env.dify.script(d.answer("delta " * pieces, pieces=pieces, delay=1 / per_second), match="live", times=None)
    env.dify.script(d.answer("A finished answer of moderate length. " * 20), match="finished", times=None)
    server.script(o.answer("delta " * pieces, pieces=pieces, delay=1 / per_second), match="live", times=None)
    server.script(o.answer("A finished answer of moderate length. " * 20), match="finished", times=None)


def open_streams(env: harness.Environment, url: str, live: int, finished: int) -> list[str]:
    sim = env.simulator(url, poll_interval=0.05)
    ids = [sim.send(sim.text_message("live", userid=f"live{i}"))["stream"]["id"] for i in range(live)]
    for i in range(finished):
        first = sim.send(sim.text_message("finished", userid=f"done{i}"))
        ids.append(sim.follow(first, userid=f"done{i}").stream_id)
    sim.close()
    return ids


def polls(env: harness.Environment, server: OpenAIStandIn, options) -> dict:
    samples: dict[str, list[float]] = {"dify": [], "openai": []}
    script_live(env, server, options.seconds * 2 + 20, 30.0)
    for round_number in range(options.rounds):
        for backend in ("dify", "openai"):
            extra = openai_settings(server) if backend == "openai" else {}
            gateway = env.start_gateway(f"polls-{backend}-{round_number}", **extra)
            try:
                ids = open_streams(env, gateway.url, options.live, 50)
                sim = env.simulator(gateway.url)
                result = harness.wrk(gateway.url, harness.signed_polls(sim, ids, 2000), options.seconds, 16)
                sim.close()
            finally:
                env.stop_gateway(gateway)
            samples[backend].append(result.rate)
            print(f"round {round_number} {backend}: {result.rate:.0f} polls/s", file=sys.stderr)
    ratios = [new / old for new, old in zip(samples["openai"], samples["dify"], strict=True)]
    return {
        "polls_per_s_openai": round(statistics.median(samples["openai"]), 1),
        "polls_per_s_dify": round(statistics.median(samples["dify"]), 1),
        "ratio_openai_to_dify": round(statistics.median(ratios), 3),
        "ratio_by_round": [round(r, 3) for r in ratios],
    }


class FirstWrites:
    """When each stream's answer list was first written, from Redis's keyspace notifications (no polling)."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)
        self.client.config_set("notify-keyspace-events", "Kl")
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe("__keyspace@*__:*:chunks")
        self.first: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(timeout=0.1)
            if message and message["type"] == "pmessage":
                at = time.perf_counter()
                key = message["channel"].decode().split(":", 1)[1]
                stream_id = key.split("{", 1)[1].split("}", 1)[0]
                self.first.setdefault(stream_id, at)

    def wait_for(self, stream_id: str, timeout: float = 10.0) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stream_id in self.first:
                return self.first[stream_id]
            time.sleep(0.001)
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.pubsub.close()
        self.client.close()


def through_gateway(env: harness.Environment, url: str, writes: FirstWrites, count: int) -> list[float]:
    """Milliseconds from each message's POST to its first text in Redis."""
    sim = env.simulator(url)
    sim.send(sim.text_message("warm up", userid="warm"))
    time.sleep(1.0)
    taken = []
    for n in range(count):
        started = time.perf_counter()
        reply = sim.send(sim.text_message(f"first {n}", userid=f"first{n % 20}"))
        at = writes.wait_for(reply["stream"]["id"])
        if at is not None:
            taken.append((at - started) * 1000)
        time.sleep(0.05)
    sim.close()
    return taken


def directly_from_dify(env: harness.Environment, count: int) -> list[float]:
    """Milliseconds from a request to Dify's stand-in to its first `message` event, as its client reads it."""
    taken = []
    with httpx.Client(timeout=10) as client:
        for n in range(count):
            started = time.perf_counter()
            body = {"query": f"first {n}", "inputs": {}, "user": "direct", "response_mode": "streaming"}
            headers = {"Authorization": f"Bearer {harness.DIFY_KEY}"}
            with client.stream("POST", f"{env.dify.base_url}/chat-messages", json=body, headers=headers) as response:
                for line in response.iter_lines():
                    if line.startswith("data:") and '"event": "message"' in line.replace('":"', '": "'):
                        taken.append((time.perf_counter() - started) * 1000)
                        break
            time.sleep(0.05)
    return taken


def directly_from_openai(server: OpenAIStandIn, count: int) -> list[float]:
    """Milliseconds from a request to the OpenAI-compatible stand-in to its first content chunk."""
    taken = []
    with httpx.Client(timeout=10) as client:
        for n in range(count):
            started = time.perf_counter()
            body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": f"first {n}"}]}
            with client.stream("POST", f"{server.base_url}/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if '"content"' in line:
                        taken.append((time.perf_counter() - started) * 1000)
                        break
            time.sleep(0.05)
    return taken


def first_text(env: harness.Environment, server: OpenAIStandIn, options) -> dict:
    delay = options.first_token_ms / 1000
    env.dify.script([d.sleep(delay), *d.answer("first text and the rest", pieces=4)], match="first", times=None)
    server.script([o.sleep(delay), *o.answer("first text and the rest", pieces=4)], match="first", times=None)
    writes = FirstWrites(env.redis.url)
    result: dict = {"first_token_ms": options.first_token_ms, "messages": options.messages}
    try:
        for backend in ("dify", "openai"):
            extra = openai_settings(server) if backend == "openai" else {}
            gateway = env.start_gateway(f"first-{backend}", **extra)
            try:
                gateway_ms = through_gateway(env, gateway.url, writes, options.messages)
            finally:
                env.stop_gateway(gateway)
            direct = directly_from_openai(server, options.messages) if backend == "openai" else None
            direct = direct or directly_from_dify(env, options.messages)
            result[backend] = {
                "gateway_p50_ms": round(statistics.median(gateway_ms), 2),
                "gateway_p99_ms": round(harness.percentile(gateway_ms, 99), 2),
                "direct_p50_ms": round(statistics.median(direct), 2),
                "direct_p99_ms": round(harness.percentile(direct, 99), 2),
                "added_p50_ms": round(statistics.median(gateway_ms) - statistics.median(direct), 2),
                "measured": len(gateway_ms),
            }
            print(f"{backend}: {result[backend]}", file=sys.stderr)
    finally:
        writes.close()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="of wrk per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--live", type=int, default=20, help="answers streaming at 30 deltas/s during the polls")
    parser.add_argument("--messages", type=int, default=200, help="for the first-text latency")
    parser.add_argument("--first-token-ms", type=int, default=200, help="how long each server holds its first text")
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    env = harness.start_environment()
    server = OpenAIStandIn(model=MODEL).start()
    try:
        result = {
            "first_text": first_text(env, server, options),
            "polls": polls(env, server, options),
            "machine": harness.machine(),
        }
    finally:
        server.stop()
        env.close()
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
