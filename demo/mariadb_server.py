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

PORT_TRIES = 5
PORT_TAKEN = "Address already in use"  # MariaDB's error log, when another process took the port first

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
        self._started = False  # once started, it keeps its port

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
        # A port chosen free is only known to be free until it is let go, and another process (a parallel test
        # worker's server) may take it first: the server then exits at once, and a first start tries another port
        # (as demo/redis_server.py does). A fresh-clone run once lost a test worker's every database test so.
        for _ in range(PORT_TRIES):
            (self.dir / "error.log").unlink(missing_ok=True)
            self.process = subprocess.Popen(
                self._command(server, data, tmp, user), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if self._wait_ready(60):
                self._started = True
                return self
            if self._started or PORT_TAKEN not in self._log_tail():
                break  # a restart keeps its port: its clients know it
            self.port = free_port()
        tail = self._log_tail()
        self.remove()
        raise RuntimeError(f"the private MariaDB did not start on port {self.port}:\n{tail}")

    def _command(self, server: str, data: Path, tmp: Path, user: str) -> list[str]:
        return [
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
        ]

    def _wait_ready(self, timeout: float) -> bool:
        """Whether our server answers within `timeout` s (False at once when it exits)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if self._answers_as_ours():
                    return True
            except (pymysql.MySQLError, OSError):  # not up yet, or another process's server on the port
                pass
            time.sleep(0.1)
        return False

    def _answers_as_ours(self) -> bool:
        """Whether the server on our port is ours (its socket file is ours), never trusting whoever answers."""
        connection = pymysql.connect(host="127.0.0.1", port=self.port, user="root", connect_timeout=1, read_timeout=2)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT @@socket")
                return cursor.fetchone()[0] == str(self.dir / "mysqld.sock")
        finally:
            connection.close()

    def _log_tail(self) -> str:
        log = self.dir / "error.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

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
