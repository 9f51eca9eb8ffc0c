"""A redis-server of our own on a free port (no persistence), for the end-to-end tests and benchmarks that must
stop, pause or restart Redis without disturbing anyone else's."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from demo.replicas import free_port


class PrivateRedisServer:
    """`start()` runs it, `stop()` kills it (its data is gone), `pause()`/`resume()` freeze and thaw it."""

    def __init__(self, directory: Path | None = None) -> None:
        self.port = free_port()
        self._made_dir = directory is None  # a directory of our own is removed again by stop()
        self.dir = Path(directory or tempfile.mkdtemp(prefix="private-redis-"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, socket_connect_timeout=0.2)

    def start(self) -> PrivateRedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)  # again after a stop()
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [*command, "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = self.client()
        for _ in range(100):
            try:
                client.ping()
                return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.running:
            self.resume()  # a frozen (SIGSTOP) process must run again to die
            self.process.kill()
            self.process.wait(5)
        if self._made_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)
