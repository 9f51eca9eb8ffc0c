"""Chatflow and workflow runs in the Dify stand-in that can be streamed again (`GET /workflow/{run id}/events`):
as in Dify, a run goes on when its first reader is gone, and a reader that attaches later gets its events."""

from __future__ import annotations

import asyncio


class RunLog:
    """One chatflow or workflow run: every frame it produced, whether it has ended, and its end-user. Readers that
    re-attach get the frames from the start and then follow the run; a finished run gives its workflow_finished
    frame alone (as Dify does)."""

    def __init__(self, user: str):
        self.user = user
        self.frames: list[bytes] = []
        self.finished_frame = b""
        self.ended = False
        self.paused = False  # waiting for a person's form (a reader without continue_on_pause stops here)
        self._changed = asyncio.Event()

    def add(self, frame: bytes) -> None:
        self.frames.append(frame)
        if b'"workflow_finished"' in frame:
            self.finished_frame = frame
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def pause(self, paused: bool) -> None:
        self.paused = paused
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, continue_on_pause: bool = False):
        """The frames for a reader that attaches now; without `continue_on_pause`, up to the pause of a run that
        waits for a form."""
        if self.ended:
            if self.finished_frame:
                yield self.finished_frame
            return
        sent = 0
        while True:
            while sent < len(self.frames):
                yield self.frames[sent]
                sent += 1
            if self.ended or (self.paused and not continue_on_pause):
                return
            await self._changed.wait()


class RunConn:
    """A connection wrapper for a run: every frame also goes to the run's log, and a reader that went away (its
    replica was killed) does not stop the run."""

    def __init__(self, conn, log: RunLog):
        self.conn = conn
        self.log = log
        self.gone = False

    async def start_stream(self, **kwargs) -> None:
        await self._guard(self.conn.start_stream(**kwargs))

    async def write_chunk(self, data: bytes) -> None:
        if data.startswith(b"data: "):
            self.log.add(data)
        await self._guard(self.conn.write_chunk(data))

    async def end_stream(self) -> None:
        self.log.end()
        await self._guard(self.conn.end_stream())

    async def pause(self) -> None:
        """The run waits for a form: its HTTP stream ends, the run does not."""
        self.log.pause(True)
        await self._guard(self.conn.end_stream())

    async def send(self, *args, **kwargs) -> None:
        self.log.end()
        await self._guard(self.conn.send(*args, **kwargs))

    def abort(self) -> None:
        self.conn.abort()
        self.gone = True

    async def _guard(self, write) -> None:
        if self.gone:
            write.close()
            return
        try:
            await write
        except (ConnectionError, OSError):
            self.gone = True


class LogOnly:
    """Where a run's frames go after a form's answer: into its log only (readers re-attach to follow it)."""

    def __init__(self, log: RunLog):
        self.log = log
        log.pause(False)

    async def start_stream(self, **kwargs) -> None:
        return None

    async def write_chunk(self, data: bytes) -> None:
        if data.startswith(b"data: "):
            self.log.add(data)

    async def end_stream(self) -> None:
        self.log.end()

    async def pause(self) -> None:
        self.log.pause(True)

    async def send(self, *args, **kwargs) -> None:
        self.log.end()

    def abort(self) -> None:
        self.log.end()
