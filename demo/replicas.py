"""Run the gateway as real gunicorn processes (for end-to-end tests and benchmarks), and stop them however the
caller needs: SIGTERM, SIGKILL, or a clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from config.settings import PROJECT_ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GunicornReplica:
    """One replica: `gunicorn -c gunicorn.conf.py <app>` with its own port and environment."""

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        name: str,
        workers: int = 2,
        app: str = "app:create_app()",
        cwd: Path = PROJECT_ROOT,
        extra_args: tuple[str, ...] = (),
    ):
        self.port = free_port()
        self.name = name
        self.app = app
        self.cwd = cwd  # another checkout of the project, e.g. to benchmark an earlier commit
        self.extra_args = extra_args
        self.log_path = log_dir / f"{name}.log"
        self.env = {
            **os.environ,
            **env,
            "PORT": str(self.port),
            "BIND_HOST": "127.0.0.1",
            "GUNICORN_WORKERS": str(workers),
            "REPLICA_ID": name,
        }
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> GunicornReplica:
        """Start gunicorn and wait until /readyz answers 200."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        gunicorn = str(Path(sys.executable).with_name("gunicorn"))
        self.process = subprocess.Popen(
            [gunicorn, "-c", "gunicorn.conf.py", *self.extra_args, self.app],
            cwd=self.cwd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.logs()[-2000:]}")
            if self._ready() and self._all_workers_listening():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not become ready: {self.logs()[-2000:]}")

    def _all_workers_listening(self) -> bool:
        """With reuse_port every worker has its own listening socket: wait for all of them, so that connections
        opened right away are spread over every worker instead of piling onto the first one up."""
        workers = psutil.Process(self.process.pid).children()
        listening = [
            w
            for w in workers
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in w.net_connections("tcp"))
        ]
        return len(listening) >= int(self.env["GUNICORN_WORKERS"]) or self.env.get("GUNICORN_REUSE_PORT") == "false"

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False  # not listening yet

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def signal_worker(self, pid: int, sig: int) -> None:
        """Signal one worker process (gunicorn's master starts a new one in its place after a SIGKILL)."""
        if self.process and self.process.poll() is None:
            os.kill(pid, sig)

    def reload(self) -> None:
        """SIGHUP to gunicorn's master only (as `kill -HUP <master>`): new workers on fresh settings, the old ones
        drain. Sent to the whole group it would kill the workers outright (a worker's SIGHUP is the default one)."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL the whole replica (master and workers) and wait for it."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)
            self._log.close()

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait(5)
        self._log.close()
