"""Many concurrent streams on one replica (BENCHMARKS.md §2).

The Dify stand-in streams to `--streams` simultaneous conversations at `--rate` deltas/s each; every stream is
polled like WeCom does (from its first reply on, every `--poll-interval` s). Each delta carries its own send
time, so the poller records when it first appears in a poll reply. The stand-in runs in a process of its own, as
Dify would, so that it and the poller do not queue behind each other for one interpreter lock. Reported: the
replica's peak RSS (gunicorn master and workers), the delta-to-poll delay, errors, Redis commands per delta, Redis
memory per finished stream, and the CPU each process used.

    python -m bench.streams_load --streams 1000 --rate 20 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import threading
import time
from urllib.parse import urlencode

import orjson
import psutil

from bench import harness
from demo import dify_standin as d
from demo.dify_standin import DifyStandIn

_STAMP = re.compile(r"(\d{10}\.\d{6});")
OPENING_CONCURRENCY = 32  # new messages in flight at once while the conversations open


def cpu_seconds(pid: int, children: bool = True) -> float:
    """CPU time (user + system) used so far by a process and (unless told not to) its children."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *(root.children(recursive=True) if children else [])]:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def redis_calls(client) -> dict[str, int]:
    """Calls per command since the server started (INFO commandstats)."""
    return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in client.info("commandstats").items()}


class RssSampler(threading.Thread):
    """Samples the replica's resident memory (all its processes) until stopped; keeps the peak."""

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak_mb = pid, every, 0.0
        self.samples: list[float] = []
        self._finished = threading.Event()

    def run(self) -> None:
        while not self._finished.wait(self.every):
            rss = harness.process_rss_mb(self.pid)
            self.samples.append(rss)
            self.peak_mb = max(self.peak_mb, rss)

    def stop(self) -> None:
        self._finished.set()
        self.join()


class StandInProcess:
    """The Dify stand-in in a child process, playing the clocked answer to every chat request that asks "load"."""

    def __init__(self, deltas: int, rate: float):
        context = multiprocessing.get_context("spawn")
        self._urls = context.Queue()
        self.process = context.Process(target=_serve_clocked_answers, args=(deltas, rate, self._urls), daemon=True)

    def start(self) -> str:
        """Start it; returns its base URL."""
        self.process.start()
        return self._urls.get(timeout=30)

    def stop(self) -> None:
        self.process.kill()
        self.process.join()


def _serve_clocked_answers(deltas: int, rate: float, urls) -> None:
    standin = DifyStandIn(api_key=harness.DIFY_KEY).start()
    standin.script(d.clocked_answer(deltas, rate), match="load", times=None)
    urls.put(standin.base_url)
    threading.Event().wait()


async def _callback(port: int, query: dict, body: bytes, connection=None):
    return await harness.post("127.0.0.1", port, f"{harness.CALLBACK}?{urlencode(query)}", body, connection)


async def open_and_poll(sim, port: int, count: int, interval: float, seconds: float) -> dict:
    """Send `count` new messages from as many users, `OPENING_CONCURRENCY` at a time (each on a fresh connection,
    as WeCom's are), and poll each stream from the moment its first reply arrives, about once per `interval`, until
    it finishes, as WeCom does; record each stamp's first appearance in a poll reply."""
    delays: list[tuple[float, float]] = []  # (when the delta was sent, its delay)
    errors: list[str] = []
    finals: dict[str, str] = {}
    polls = 0
    poll_seconds: list[float] = []  # each poll's request-to-reply time
    poll_gaps: list[float] = []  # time between one stream's consecutive polls
    deadline = time.time() + seconds + 120

    async def follow(stream_id: str, userid: str) -> None:
        nonlocal polls
        connection = None
        seen_length = 0
        previous = None
        while time.time() < deadline:
            await asyncio.sleep(interval)  # WeCom's first refresh, and each next one, comes about `interval` later
            asked = time.time()
            if previous is not None:
                poll_gaps.append(asked - previous)
            previous = asked
            query, body = sim.envelope(sim.poll_message(stream_id, userid))
            try:
                connection, head, payload = await _callback(port, query, body, connection)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                errors.append(f"{type(exc).__name__} polling {stream_id}")
                connection = None
                continue
            received = time.time()
            polls += 1
            poll_seconds.append(received - asked)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(f"HTTP {head[9:12].decode()} for {stream_id}")
                continue
            stream = sim.open_reply(orjson.loads(payload), query["nonce"])["stream"]
            content = stream["content"]
            for stamp in _STAMP.finditer(content, seen_length):  # deltas are appended whole: new ones start here
                sent = float(stamp.group(1))
                delays.append((sent, received - sent))
            seen_length = max(seen_length, len(content))
            if stream["finish"]:
                finals[stream_id] = content
                break
        if connection is not None:
            connection[1].close()

    async def converse(i: int) -> None:
        userid = f"u{i}"
        async with opening:
            query, body = sim.envelope(sim.text_message("load", userid=userid))
            try:
                connection, head, payload = await _callback(port, query, body)
                connection[1].close()
                if not head.startswith(b"HTTP/1.1 200"):
                    raise ConnectionError(f"HTTP {head[9:12].decode()}")
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                errors.append(f"{type(exc).__name__} sending message {i}: {exc}")
                return
            stream_id = sim.open_reply(orjson.loads(payload), query["nonce"])["stream"]["id"]
            opened_at.append(time.time())
        await follow(stream_id, userid)

    opening = asyncio.Semaphore(OPENING_CONCURRENCY)
    opened_at: list[float] = []
    started = time.time()
    await asyncio.gather(*(converse(i) for i in range(count)))
    return {
        "delays": delays,
        "errors": errors,
        "finals": finals,
        "polls": polls,
        "poll_seconds": poll_seconds,
        "poll_gaps": poll_gaps,
        "started": started,
        "open_seconds": max(opened_at, default=started) - started,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="deltas per second per stream")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long each answer streams")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    harness.add_gunicorn_arguments(parser)
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)

    env = harness.start_environment()
    deltas_each = int(options.rate * options.seconds)
    standin = StandInProcess(deltas_each, options.rate)
    try:
        gateway = env.start_gateway(
            "streams",
            workers=options.workers,
            GUNICORN_THREADS=str(options.threads),
            GUNICORN_WORKER_CLASS=options.worker_class,
            STREAM_MAX_ACTIVE=str(options.streams + 100),
            DIFY_BASE_URL=standin.start(),
        )
        client = env.redis.client()
        rss_idle = harness.process_rss_mb(gateway.process.pid)
        memory_before = client.info("memory")["used_memory"]
        sim = env.simulator(gateway.url)
        sampler = RssSampler(gateway.process.pid)
        sampler.start()
        calls_before = redis_calls(client)
        processes = {
            "gateway": gateway.process.pid,
            "redis": env.redis.process.pid,
            "dify stand-in": standin.process.pid,
        }
        processes["poller"] = os.getpid()  # its children are the processes above: counted without them
        cpu_before = {name: cpu_seconds(pid, children=name != "poller") for name, pid in processes.items()}
        outcome = asyncio.run(open_and_poll(sim, gateway.port, options.streams, options.poll_interval, options.seconds))
        sampler.stop()
        opened, open_seconds = outcome["started"], outcome["open_seconds"]
        elapsed = time.time() - opened
        cpu_after = {name: cpu_seconds(pid, children=name != "poller") for name, pid in processes.items()}
        calls_after = redis_calls(client)
        time.sleep(1)
        memory_after = client.info("memory")["used_memory"]
        sim.close()
    finally:
        standin.stop()
        env.close()

    total_deltas = options.streams * deltas_each
    evalsha = calls_after.get("evalsha", 0) - calls_before.get("evalsha", 0)
    all_calls = sum(calls_after.values()) - sum(calls_before.values())
    polls = outcome["polls"]
    stamps = [[float(stamp) for stamp in _STAMP.findall(content)] for content in outcome["finals"].values()]
    complete = [each for each in stamps if len(each) == deltas_each]
    # The rate each answer was really sent at: the stand-in's clock slips when the machine is saturated.
    sent_rates = [(len(each) - 1) / (each[-1] - each[0]) for each in complete if len(each) > 1 and each[-1] > each[0]]
    delays_ms = [delay * 1000 for _, delay in outcome["delays"]]
    all_open = opened + open_seconds
    steady_ms = [delay * 1000 for sent, delay in outcome["delays"] if sent >= all_open]

    def quantile(values: list[float], p: float) -> float | None:
        return round(harness.percentile(values, p), 1) if values else None

    result = {
        "streams": options.streams,
        "deltas_per_s_each": options.rate,
        "sent_deltas_per_s_each_p50": quantile(sent_rates, 50),
        "sent_deltas_per_s_all": round(sum(sent_rates), 1),
        "seconds": options.seconds,
        "poll_interval_s": options.poll_interval,
        "gunicorn": f"{options.worker_class} {options.workers}x{options.threads}",
        "opening_all_streams_s": round(open_seconds, 1),
        "rss_idle_mb": round(rss_idle, 1),
        "rss_peak_mb": round(sampler.peak_mb, 1),
        "delay_p50_ms": quantile(delays_ms, 50),
        "delay_p99_ms": quantile(delays_ms, 99),
        "delay_max_ms": quantile(delays_ms, 100),
        # the same for the deltas sent once every stream was open (no new messages arriving meanwhile)
        "steady_delay_p50_ms": quantile(steady_ms, 50),
        "steady_delay_p99_ms": quantile(steady_ms, 99),
        # where a delay comes from: the wait for the next poll (one poll gap at most) plus that poll's reply time
        "poll_reply_p50_ms": quantile([t * 1000 for t in outcome["poll_seconds"]], 50),
        "poll_reply_p99_ms": quantile([t * 1000 for t in outcome["poll_seconds"]], 99),
        "poll_gap_p99_ms": quantile([t * 1000 for t in outcome["poll_gaps"]], 99),
        "deltas_seen": len(delays_ms),
        "deltas_sent": total_deltas,
        "polls": polls,
        "errors": len(outcome["errors"]) + (options.streams - len(complete)),
        "error_samples": outcome["errors"][:5],
        "streams_complete": len(complete),
        # Script calls other than polls (appends, leases, finishes), per delta. Until the per-stream appends of
        # 2026-11-22 (one call per stream, pipelined), one call carried a whole batch: then it counted round trips.
        "redis_script_calls_per_delta": round((evalsha - polls) / total_deltas, 3),
        "redis_commands_per_delta_incl_polls": round(all_calls / total_deltas, 2),
        "redis_bytes_per_finished_stream": round((memory_after - memory_before) / options.streams),
        "wall_s": round(elapsed, 1),
        "cpu_cores_used": {k: round((cpu_after[k] - cpu_before[k]) / elapsed, 2) for k in cpu_before},
        "gateway_cpu_us_per_delta": round(
            (cpu_after["gateway"] - cpu_before["gateway"]) / max(1, len(delays_ms)) * 1e6, 1
        ),
        "machine": harness.machine(),
    }
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
