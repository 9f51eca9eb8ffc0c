"""Gunicorn settings: `gunicorn -c gunicorn.conf.py 'app:create_app()'`.

Threaded workers (gthread): a callback is short (decrypt, one Redis round trip, encrypt), the Dify streams run
in background threads of the same worker, and polls for any stream can land on any worker of any replica.
Numbers come from the environment so a Deployment can tune them without a new image.
"""

import os
import sys
import tempfile
from pathlib import Path

from config import bots
from config.settings import SettingsError, load_settings

# The worker classes this image ships: gevent and eventlet are not installed, and the stream threads and read pump
# have only been checked under real threads (BENCHMARKS.md §4).
SHIPPED_WORKER_CLASSES = ("gthread", "sync")


def _exit_with(*problems: str) -> None:
    for problem in problems:
        print(f"configuration error: {problem}", file=sys.stderr)  # noqa: T201 - logging is not set up yet
    sys.exit(2)


def _whole_number(name: str, default: int) -> int:
    """A positive integer from the environment, or one clear line and exit status 2 (not gunicorn's traceback)."""
    raw = os.environ.get(name, "").strip() or str(default)
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:  # isdigit alone also accepts digits like '٣'
        _exit_with(f"{name} must be a whole number of at least 1 (got {raw!r})")
    return int(raw)


def _worker_class() -> str:
    name = os.environ.get("GUNICORN_WORKER_CLASS", "").strip() or "gthread"
    if name not in SHIPPED_WORKER_CLASSES:
        _exit_with(f"GUNICORN_WORKER_CLASS must be one of {', '.join(SHIPPED_WORKER_CLASSES)} (got {name!r})")
    return name


bind = f"{os.environ.get('BIND_HOST', '0.0.0.0')}:{os.environ.get('PORT', '8080')}"
workers = _whole_number("GUNICORN_WORKERS", 2)
worker_class = _worker_class()
threads = _whole_number("GUNICORN_THREADS", 1 if worker_class == "sync" else 4)
if worker_class == "sync" and threads > 1:  # gunicorn would quietly run gthread instead
    _exit_with(f"GUNICORN_WORKER_CLASS=sync takes one thread per worker (got GUNICORN_THREADS={threads})")
# A request never blocks on Dify (streams run in their own threads), so a worker silent for 30 s is stuck.
timeout = _whole_number("GUNICORN_TIMEOUT", 30)
# A stopping worker gives its running answers this long to finish (see worker_exit), then hands them over.
graceful_timeout = _whole_number("GUNICORN_GRACEFUL_TIMEOUT", 120)
keepalive = 5
# Each worker listens on its own SO_REUSEPORT socket, so the kernel spreads connections over the workers.
# With one shared socket, the few long-lived keep-alive connections of a proxy (or a load generator) were seen
# all landing on one worker, leaving the other core idle (BENCHMARKS.md, "gunicorn settings").
reuse_port = os.environ.get("GUNICORN_REUSE_PORT", "true").lower() in ("1", "true", "yes")
# Restarting workers after N requests would cut the Dify streams they run; leave it off.
max_requests = 0
# Each worker builds its own app after the fork: threads and connection pools do not survive a fork.
preload_app = False

# JSON logs under gunicorn unless the environment says otherwise.
os.environ.setdefault("LOG_FORMAT", "json")
# Prometheus multiprocess mode: every worker writes its metrics to files here, and /metrics on any worker adds
# them up. Set before the workers start (they import prometheus_client after the fork).
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="gateway-metrics-"))
# The folder the master and its workers share for the last good copy of BOTS_FILE (config/bots.py,
# load_bots_keeping_last_good): create_app reads it from here.
os.environ.setdefault(bots.RUN_DIR_VARIABLE, tempfile.mkdtemp(prefix="gateway-run-"))


def on_starting(server):
    """Check the settings once in the master, so a bad value is one line and not a worker boot loop."""
    try:
        settings = load_settings()
        bots.load_bots_keeping_last_good(settings, Path(os.environ[bots.RUN_DIR_VARIABLE]))
    except SettingsError as exc:
        _exit_with(*exc.problems)
    for stale in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
        stale.unlink()  # an operator-provided directory may hold a previous run's files
    if settings.redis.url.startswith("memory://") and server.cfg.workers > 1:  # demo mode only (settings)
        _exit_with(
            "REDIS_URL=memory:// keeps state inside one process; "
            f"set REDIS_URL to a Redis server to run {server.cfg.workers} workers"
        )


def on_reload(server):
    """HUP: the new workers read the settings and BOTS_FILE again (the old ones drain as on SIGTERM). A bad file
    would stop every new worker, and with them the replica: they serve the file's last good copy instead (each
    says so in its log), and so does this check."""
    try:
        _, problems = bots.load_bots_keeping_last_good(load_settings(), Path(os.environ[bots.RUN_DIR_VARIABLE]))
    except SettingsError as exc:
        problems = exc.problems
    for problem in problems:
        server.log.error("configuration error (HUP): %s", problem)
    if problems:
        server.log.error("the new settings are not used: the workers keep serving the last good bots")


# Seconds of the graceful timeout kept back for handing unfinished streams over and exiting before the SIGKILL.
DRAIN_MARGIN_SECONDS = 5


def when_ready(server):
    """Say where the workers listen (with reuse_port each opens its own socket, so gunicorn's own "Listening at:"
    line has no address to show); with METRICS_PORT set, the master serves every worker's metrics there (and the
    public port does not)."""
    sockets = "each worker on a SO_REUSEPORT socket of its own" if reuse_port else "one socket the workers share"
    server.log.info("Listening at: http://%s (%s)", bind, sockets)
    port = load_settings().metrics_port  # checked by on_starting
    if port:
        from services import metrics

        metrics.serve(os.environ.get("BIND_HOST", "0.0.0.0"), port)


def post_worker_init(worker):
    """A worker that serves starts the gateway's background work (long-connection holders, answer consumers); the
    app alone, as `flask` commands build it, starts none."""
    gateway = getattr(worker.wsgi, "extensions", {}).get("gateway")
    if gateway is not None:
        gateway.start()


def worker_exit(server, worker):
    """On SIGTERM (rolling update, scale-down): once this worker has stopped taking requests, let its streams
    finish, then hand the rest to the other replicas (see Gateway.drain)."""
    app = getattr(worker, "wsgi", None)
    gateway = getattr(app, "extensions", {}).get("gateway") if app is not None else None
    if gateway is not None:
        gateway.drain(max(1.0, server.cfg.graceful_timeout - DRAIN_MARGIN_SECONDS))


def child_exit(server, worker):
    """A worker died or stopped: its live gauges (streams_active) must stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
