"""How a replica serves the links to files Dify makes (BENCHMARKS.md §12): `--downloaders` users download the same
`--megabytes` file through its signed link at once, `--rounds` times, from one gateway replica (gunicorn); the
replica streams each download from the Dify stand-in as it arrives. Measured: throughput, each download's time,
and the replica's memory (RSS of its master and workers) before, at its peak while the downloads run, and after,
which must stay flat: no download is held whole in memory.

    python -m bench.file_links --json file-links.json
"""

from __future__ import annotations

import argparse
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil

from bench import harness
from demo import dify_standin as d

SECRET = "bench-file-link-secret-0123456789"
PUBLIC = "https://files.bench.example"
LINK = re.compile(r"\]\((https?://[^)\s]+/wecom/files/[^)\s]+)\)")


def replica_rss_mb(replica) -> float:
    """RSS of a gunicorn replica: its master and its workers."""
    master = psutil.Process(replica.process.pid)
    processes = [master, *master.children(recursive=True)]
    return round(sum(p.memory_info().rss for p in processes if p.is_running()) / 2**20, 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=10)
    parser.add_argument("--downloaders", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    harness.add_gunicorn_arguments(parser)
    options = parser.parse_args(argv)
    env = harness.start_environment()
    try:
        body = os.urandom(options.megabytes * 2**20)
        env.dify.script([d.message("The file:"), d.tool_file(body, "zip", "document", "data.zip"), d.end()], times=None)
        replica = env.start_gateway(
            "files",
            workers=options.workers,
            PUBLIC_BASE_URL=PUBLIC,  # the link's host; the downloads go to the replica's own port
            FILE_LINK_SECRET=SECRET,
            FILE_MAX_BYTES=str(max(20, options.megabytes * 2) * 2**20),
        )
        sim = env.simulator(replica.url)
        [link] = LINK.findall(sim.ask("the file").text)
        link = link.replace(PUBLIC, replica.url)
        sim.close()
        httpx.get(link, timeout=60)  # warm: the workers' first download
        before = replica_rss_mb(replica)
        peak, stop = [before], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak.append(replica_rss_mb(replica))
                stop.wait(0.05)

        def download(_) -> float:
            started = time.perf_counter()
            received = 0
            with httpx.stream("GET", link, timeout=120) as response:
                for piece in response.iter_bytes(256 * 1024):
                    received += len(piece)
            if received != len(body):
                raise RuntimeError(f"a download was cut short: {received} of {len(body)} bytes")
            return time.perf_counter() - started

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        seconds, began = [], time.perf_counter()
        with ThreadPoolExecutor(options.downloaders) as pool:
            for _ in range(options.rounds):
                seconds += list(pool.map(download, range(options.downloaders)))
        elapsed = time.perf_counter() - began
        stop.set()
        watcher.join()
        time.sleep(1)
        after = replica_rss_mb(replica)
        total_mb = options.megabytes * options.downloaders * options.rounds
        result = {
            "benchmark": "file_links",
            "machine": harness.machine(),
            "workers": options.workers,
            "file_mb": options.megabytes,
            "concurrent_downloads": options.downloaders,
            "downloads": len(seconds),
            "throughput_mb_per_s": round(total_mb / elapsed, 1),
            "download_seconds": {
                "p50": round(harness.percentile(seconds, 50), 2),
                "max": round(max(seconds), 2),
            },
            "replica_rss_mb": {"before": before, "peak": max(peak), "after": after},
        }
    finally:
        env.close()
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
