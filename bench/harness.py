"""What every benchmark needs: a private Redis, the Dify stand-in, gateway replicas under gunicorn, signed poll
requests, and two load generators (wrk for the throughput ceiling, an open-loop asyncio client for latency at a
fixed rate, timed from each request's scheduled send so queueing shows up in the numbers)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import httpx
import psutil

from config.settings import PROJECT_ROOT
from demo.dify_standin import DifyStandIn
from demo.redis_server import PrivateRedisServer
from demo.replicas import GunicornReplica
from demo.wecom_simulator import WeComSimulator

TOKEN = "bench-token"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
DIFY_KEY = "app-bench"
CALLBACK = "/wecom/callback"
WRK_SCRIPT = Path(__file__).with_name("rotate_requests.lua")


def machine() -> str:
    """One line describing where the numbers came from."""
    cpu = platform.processor() or platform.machine()
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {round(psutil.virtual_memory().total / 2**30)} GiB, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def add_gunicorn_arguments(parser) -> None:
    """The gunicorn settings a benchmark's replica runs with (defaults: those of gunicorn.conf.py)."""
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--worker-class", default="gthread")


def report(result, json_path: str | None) -> None:
    """Print a benchmark's result, and keep it as JSON when `--json PATH` was given."""
    print(json.dumps(result, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


@dataclass
class Environment:
    """A running benchmark setup: Redis, the Dify stand-in, and helpers to start gateways against them."""

    redis: PrivateRedisServer
    dify: DifyStandIn
    log_dir: Path
    replicas: list[GunicornReplica] = field(default_factory=list)

    def gateway_env(self, **extra: str) -> dict[str, str]:
        env = {
            "DEMO_MODE": "false",
            "BOTS_FILE": "",  # demo.env names the demo's bots; a benchmark's gateway is the environment's one bot
            "WECOM_TOKEN": TOKEN,
            "WECOM_ENCODING_AES_KEY": AES_KEY,
            "DIFY_BASE_URL": self.dify.base_url,
            "DIFY_API_KEY": DIFY_KEY,
            "REDIS_URL": self.redis.url,
            "AUTH_MODE": "none",
            "LOG_LEVEL": "WARNING",
            "STREAM_MAX_ACTIVE": "5000",
        }
        env.update(extra)
        return env

    def start_gateway(
        self, name: str, workers: int = 2, app: str = "app:create_app()", **extra: str
    ) -> GunicornReplica:
        # BENCH_APP_DIR runs another checkout's app (an earlier commit, for before/after figures) under this
        # harness; BENCH_GUNICORN_ARGS adds gunicorn options that checkout's gunicorn.conf.py lacks.
        cwd = Path(os.environ.get("BENCH_APP_DIR", PROJECT_ROOT))
        extra_args = tuple(os.environ.get("BENCH_GUNICORN_ARGS", "").split())
        replica = GunicornReplica(
            self.gateway_env(**extra), self.log_dir, name, workers=workers, app=app, cwd=cwd, extra_args=extra_args
        )
        self.replicas.append(replica.start())
        return replica

    def stop_gateway(self, replica: GunicornReplica) -> None:
        """Kill it outright: a graceful stop would drain its streams for a while and disturb the next run."""
        replica.kill()
        self.replicas.remove(replica)

    def simulator(self, url: str, poll_interval: float = 1.0, keep_alive: bool = True) -> WeComSimulator:
        """The WeCom simulator for this setup; without keep-alive every request opens a fresh connection, so that
        (with reuse_port) the kernel spreads them over the workers as WeCom's many connections would be."""
        simulator = WeComSimulator(url, TOKEN, AES_KEY, poll_interval=poll_interval, timeout=30)
        if not keep_alive:
            simulator.http.close()
            simulator.http = httpx.Client(timeout=30, trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))
        return simulator

    def close(self) -> None:
        for replica in list(self.replicas):
            replica.kill()
        self.dify.stop()
        self.redis.stop()


def start_environment(ping_interval: float = 10.0) -> Environment:
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    return Environment(
        redis=PrivateRedisServer().start(),
        dify=DifyStandIn(api_key=DIFY_KEY, ping_interval=ping_interval).start(),
        log_dir=log_dir,
    )


def signed_polls(simulator: WeComSimulator, stream_ids: list[str], count: int) -> list[tuple[str, bytes]]:
    """`count` distinct, validly signed poll callbacks over `stream_ids` as (path?query, body)."""
    requests = []
    for i in range(count):
        query, body = simulator.envelope(simulator.poll_message(stream_ids[i % len(stream_ids)]))
        requests.append((f"{simulator.callback_path}?{urlencode(query)}", body))
    return requests


# --- load generators -------------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank `p`th percentile of `values` (NaN when there are none)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        return percentile(self.latencies_ms, p)

    def summary(self) -> dict:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rate": round(self.rate, 1),
            "p50_ms": round(self.percentile(50), 2),
            "p99_ms": round(self.percentile(99), 2),
            "mean_ms": round(statistics.fmean(self.latencies_ms), 2) if self.latencies_ms else None,
        }


def wrk(url: str, requests: list[tuple[str, bytes]], seconds: int, connections: int, threads: int = 1) -> LoadResult:
    """Closed-loop maximum throughput with wrk, rotating through the pre-signed requests."""
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is needed for throughput runs: apt-get install wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False) as listing:
        for path, body in requests:
            listing.write(f"{path}\t{body.decode()}\n")
    output = subprocess.run(
        [
            binary,
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            "--latency",
            "-s",
            str(WRK_SCRIPT),
            url,
            "--",
            listing.name,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    os.unlink(listing.name)
    total = int(re.search(r"(\d+) requests in", output).group(1))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", output))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    duration = float(re.search(r"requests in ([\d.]+)s", output).group(1))
    result = LoadResult(requests=total, errors=errors, seconds=duration)
    result.wrk_percentiles = {p: _ms(v) for p, v in re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", output, re.M)}
    return result


def _ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def open_loop(
    host: str, port: int, requests: list[tuple[str, bytes]], rate: float, seconds: float, max_connections: int = 64
) -> LoadResult:
    """Send requests at a fixed rate regardless of how fast answers come (no coordinated omission): each latency
    runs from the request's scheduled send time to the end of its response."""
    return asyncio.run(_open_loop(host, port, requests, rate, seconds, max_connections))


async def _open_loop(host, port, requests, rate, seconds, max_connections) -> LoadResult:
    idle: asyncio.Queue = asyncio.Queue()
    opened = 0
    latencies: list[float] = []
    errors = 0
    total = int(rate * seconds)
    started = time.perf_counter()

    async def one(i: int, scheduled: float) -> None:
        nonlocal opened, errors
        if idle.empty() and opened < max_connections:
            opened += 1
            idle.put_nowait(await asyncio.open_connection(host, port))
        path, body = requests[i % len(requests)]
        for attempt in (1, 2):  # a kept-alive connection the server has closed meanwhile is replaced once
            reader, writer = await idle.get()
            try:
                _, head, _ = await post(host, port, path, body, (reader, writer))
            except (OSError, asyncio.IncompleteReadError, AttributeError):
                writer.close()
                idle.put_nowait(await asyncio.open_connection(host, port))
                if attempt == 2:
                    errors += 1
                continue
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
            latencies.append((time.perf_counter() - scheduled) * 1000)
            if re.search(rb"connection: close", head, re.I):
                writer.close()
                idle.put_nowait(await asyncio.open_connection(host, port))
            else:
                idle.put_nowait((reader, writer))
            return

    tasks = []
    for i in range(total):
        scheduled = started + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    while not idle.empty():
        _, writer = idle.get_nowait()
        writer.close()
    return LoadResult(requests=total, errors=errors, seconds=elapsed, latencies_ms=latencies)


async def post(host: str, port: int, path: str, body: bytes, connection=None):
    """POST a JSON body over `connection` (a (reader, writer) pair; a new one if None) and read the whole response.
    Returns (connection, response head, response body)."""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    connection = connection or await asyncio.open_connection(host, port)
    reader, writer = connection
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    payload = await reader.readexactly(int(re.search(rb"content-length: (\d+)", head, re.I).group(1)))
    return connection, head, payload


def process_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children (a gunicorn master and its workers), in MiB."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:  # a child that exited since it was listed
            continue
    return total / 2**20


def project_root() -> Path:
    return PROJECT_ROOT
