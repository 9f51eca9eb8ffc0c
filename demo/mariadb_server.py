"""A private MariaDB server (as demo/redis_server.py runs a private Redis): started on a free loopback port with a
temporary data directory, removed at the end. The test suite's database (tests/conftest.py), so the tests never
touch a developer's own MariaDB and need none running, and the fault campaign's (bench/faults), which restarts it."""

from __future__ import annotations

import getpass
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pymysql

from demo.replicas import free_port

MARIADBD = "/usr/sbin/mariadbd"
MISSING = (
    "{what} is not installed: `make test` installs it when run as root; otherwise run "
    "`sudo apt-get install redis-server mariadb-server` (or set TEST_REDIS_URL / TEST_MYSQL_SERVER)"
)


def mariadb_binaries() -> tuple[str, str] | None:
    """(mariadb-install-db, mariadbd), or None when MariaDB's server is not installed."""
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    server = shutil.which("mariadbd") or (MARIADBD if Path(MARIADBD).exists() else None)
    return (install, server) if install and server else None


class PrivateMariaDB:
    """A MariaDB server of the run's own: root with no password over TCP (grant tables skipped), no binary log,
    relaxed durability (a test database is thrown away), temporary files in its own folder (concurrent
    bootstraps in one /tmp collide). `start()` runs it (installing its data directory the first time), `stop()`
    stops it and keeps its data (a test may start it again), `remove()` stops it and deletes everything."""

    def __init__(self):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="private-mariadb-"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}"

    def start(self) -> PrivateMariaDB:
        binaries = mariadb_binaries()
        if binaries is None:
            raise RuntimeError(MISSING.format(what="MariaDB's server (mariadb-server)"))
        install, server = binaries
        data, tmp, user = self.dir / "data", self.dir / "tmp", getpass.getuser()
        if not data.exists():
            tmp.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [install, "--no-defaults", f"--datadir={data}", f"--tmpdir={tmp}", f"--user={user}", "--skip-test-db"],
                check=True,
                capture_output=True,
                timeout=120,
            )
        self.process = subprocess.Popen(
            [
                server,
                "--no-defaults",
                f"--datadir={data}",
                f"--tmpdir={tmp}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                f"--socket={self.dir / 'mysqld.sock'}",
                f"--pid-file={self.dir / 'mysqld.pid'}",
                f"--log-error={self.dir / 'error.log'}",
                f"--user={user}",
                "--skip-grant-tables",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_ready(60)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                pymysql.connect(host="127.0.0.1", port=self.port, user="root", connect_timeout=1).close()
                return
            except pymysql.MySQLError:
                time.sleep(0.1)
        log = self.dir / "error.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        self.remove()
        raise RuntimeError(f"the private MariaDB did not start on port {self.port}:\n{tail}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 30 s); its data stays for a later start()."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
