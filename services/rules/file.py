"""A bot's CONTENT_RULES_FILE, in force on every replica within seconds of a change, without a restart: its stamp
(inode, modification time, size; a swap of a mounted ConfigMap's symlink changes it too) is looked at every
CHECK_SECONDS when the rules are used, and a file that changed is read again. A file that cannot be read or
compiled keeps the last good rules in force, and says so in one log line."""

from __future__ import annotations

import logging
import os
import threading
import time

from services import metrics
from services.rules.rules import ContentRules, RulesError, load

logger = logging.getLogger(__name__)

CHECK_SECONDS = 5.0


class RulesFile:
    """The rules of one bot's file, kept up to date."""

    def __init__(self, path: str, bot: str):
        self.path = path
        self.bot = bot
        self._rules = load(path)  # at start-up a bad file is a bad setting (config/settings.py says so first)
        self._stamp = _stamp(path)
        self._refused: tuple | None = None  # the stamp of a change that did not load (said once)
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        logger.info("content rules of bot %s: %d rules from %s", bot, len(self._rules), path)

    def current(self) -> ContentRules:
        """The rules in force: the file's, read again if it changed."""
        if time.monotonic() - self._checked >= CHECK_SECONDS:
            self._check()
        return self._rules

    def _check(self) -> None:
        with self._lock:
            if time.monotonic() - self._checked < CHECK_SECONDS:
                return
            self._checked = time.monotonic()
            try:
                stamp = _stamp(self.path)
            except OSError as exc:
                stamp = ("missing", str(exc.strerror))
            if stamp in (self._stamp, self._refused):
                return
            try:
                rules = load(self.path)
            except RulesError as exc:
                self._refused = stamp
                logger.error("content rules not reloaded: %s; the last good rules stay in force", exc)
                metrics.RULES_RELOADS.labels(self.bot, "rejected").inc()
                return
            self._rules, self._stamp, self._refused = rules, stamp, None
            logger.info("content rules reloaded: %d rules from %s", len(rules), self.path)
            metrics.RULES_RELOADS.labels(self.bot, "ok").inc()


def _stamp(path: str) -> tuple:
    found = os.stat(path)
    return found.st_ino, found.st_mtime_ns, found.st_size
