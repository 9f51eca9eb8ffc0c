"""Bots changed live: every serving process checks BOTS_FILE (and the files its tables name) every CHECK_SECONDS by
their stamps, reads it again only when one changed (BENCHMARKS.md §19), and hands the gateway a set of bots that
differs (Gateway.apply). A file that does not load changes nothing and is logged once (docs/configuration.md,
"Several bots in one deployment").
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from config.bots import files_named, keep_last_good, load_bots, read_text
from config.settings import BotSettings, Settings, SettingsError
from services import metrics
from services.loops import run_until

logger = logging.getLogger(__name__)

CHECK_SECONDS = 5.0


class BotsFileWatch:
    """Reads BOTS_FILE every CHECK_SECONDS in a thread of a serving process; `apply` gets each new set of bots, and
    `tick` is called after every check (the gateway closes the bots it retired once their answers are over)."""

    def __init__(
        self,
        settings: Settings,
        served: tuple[BotSettings, ...],
        apply: Callable[[tuple[BotSettings, ...]], object],
        tick: Callable[[], object] = lambda: None,
        run_dir: Path | None = None,
    ):
        self.settings = settings
        self.served = served
        self.apply = apply
        self.tick = tick
        self.run_dir = run_dir  # the folder of the replica's last good copy (gunicorn), or None
        self._refused: list[str] | None = None  # the problems last logged (a file that stays bad is said once)
        self._stamps: tuple | None = None  # of the files last read (None: read at the first check)
        self._named: list[str] = []  # the files the tables of the file last read name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one check at a time (an operator's command may call one beside the thread)

    def check(self) -> str:
        """Read the file once; 'unchanged', 'ok' (the gateway serves the new bots) or 'rejected'."""
        with self._lock:
            return self._check()

    def _check(self) -> str:
        if self._stamps is not None and self._stamps == _stamps(self.settings.bots_file, self._named):
            return "unchanged"  # neither the file nor a file it names changed since it was last read
        file_stamp = _stamp(self.settings.bots_file)  # each stamp taken before its file is read: a change while
        try:  # it is read is seen at the next check
            text = read_text(self.settings)
            self._named = files_named(self.settings, text)
            self._stamps = (file_stamp, *(_stamp(path) for path in self._named))
            bots = load_bots(self.settings, text)
            if bots == self.served:
                self._refused = None
                return "unchanged"
            self.apply(bots)  # SettingsError too: a bot could not be built, and nothing changed
        except SettingsError as exc:
            if exc.problems != self._refused:
                self._refused = exc.problems
                logger.error("BOTS_FILE not reloaded: %s; the bots served stay as they were", "; ".join(exc.problems))
                metrics.BOTS_RELOADS.labels("rejected").inc()
            return "rejected"
        self._refused = None
        self.served = bots
        if self.run_dir is not None:
            keep_last_good(self.run_dir, text)
        metrics.BOTS_RELOADS.labels("ok").inc()
        return "ok"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bots-file-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(CHECK_SECONDS + 1.0)

    def _run(self) -> None:
        def step() -> None:
            self._stop.wait(CHECK_SECONDS)
            if not self._stop.is_set():
                self.check()
                self.tick()

        run_until(self._stop, step, "bots_file_watch")


def _stamp(path: str) -> tuple:
    """What changes when a file does (followed through symlinks: a ConfigMap's swap changes it too)."""
    try:
        found = os.stat(path)
    except OSError as exc:
        return ("unreadable", exc.errno)
    return found.st_ino, found.st_mtime_ns, found.st_size


def _stamps(path: str, named: list[str]) -> tuple:
    return (_stamp(path), *(_stamp(each) for each in named))
