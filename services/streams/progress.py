"""The status line of a bubble while the backend works without text (CONTRACT: progress): when a slow step (a
tool call, an HTTP request, a knowledge retrieval, an agent node: the backend names it) has run for
PROGRESS_AFTER_SECONDS and no answer text came meanwhile, the live bubble shows one line naming it, below its text
(the stream's `prompt` field, which only a live bubble shows); the next text, or the step's end, takes it away. The
final answer never holds it.

A step's wait is a `threading.Timer`: steps are few and far apart next to text deltas, and a timer costs nothing
once cancelled; the stream's writer is thread-safe, so the timer's thread may set the field."""

from __future__ import annotations

import threading

from services.streams.writer import StreamWriter

PROGRESS_AFTER_SECONDS = 3.0
_MAX_STEP_NAME = 60


class StepProgress:
    """One answer's status line. `line` formats it from the step's name (`{step}`)."""

    def __init__(self, writer: StreamWriter, line: str, after: float = PROGRESS_AFTER_SECONDS):
        self.writer = writer
        self.line = line
        self.after = after
        self.shown = False  # a status line is on the bubble
        self._step = ""  # the step being waited for, if any
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    @property
    def pending(self) -> bool:
        """A step runs or its line shows: text must pass through the recorder, which takes the line away."""
        return bool(self._step) or self.shown

    def started(self, step_id: str, name: str) -> None:
        """A slow step began: say so if it is still running, with no text, after `after` seconds."""
        with self._lock:
            self._cancel()
            self._step = step_id
            timer = threading.Timer(self.after, self._show, args=(step_id, name.strip()[:_MAX_STEP_NAME] or "…"))
            timer.daemon = True
            self._timer = timer
        timer.start()

    def finished(self, step_id: str) -> None:
        """The step ended: its line goes (the next text, or the next step, follows)."""
        with self._lock:
            if step_id != self._step:
                return
            self._cancel()
            self._step = ""
            self._clear()

    def text_came(self) -> None:
        """Answer text arrived: nothing to wait for any more, and the line goes."""
        with self._lock:
            self._cancel()
            self._step = ""
            self._clear()

    def close(self) -> None:
        """The answer ends: no line will be shown (a final bubble never shows one)."""
        with self._lock:
            self._cancel()
            self._step = ""

    def _show(self, step_id: str, name: str) -> None:
        with self._lock:
            if step_id != self._step:
                return
            self.shown = True
            self.writer.add([], {"prompt": self.line.format(step=name)})

    def _clear(self) -> None:
        if self.shown:
            self.shown = False
            self.writer.add([], {"prompt": ""})

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
