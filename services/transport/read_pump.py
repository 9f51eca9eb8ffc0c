"""One thread that reads many sockets, so that a thread per stream does not have to wake for every read.

A stream thread that would block in recv() calls `ReadPump.wait(sock, on_data, idle_timeout)` instead: the pump
watches the socket (epoll where there is one) with every other waiting stream's, and runs `on_data(data)` in its
own thread for each recv(). The stream thread sleeps until `on_data` returns False (it wants to handle something
itself), the connection closes, nothing arrives for `idle_timeout` seconds, reading fails, or the time it asked to
be woken at (`wake_at`) comes, and then carries on with the socket back in blocking mode. With a thousand streams
of 20 reads/s, a thread per stream spent most of its CPU waking up and taking the GIL (BENCHMARKS.md §2); one loop
reading all of them does not.

`on_data` runs in the pump's thread and must not block: everything waiting in this process waits for it.
"""

from __future__ import annotations

import os
import queue
import select
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable

from services.loops import LazyThread, guarded

READ_SIZE = 64 * 1024
_SWEEP_SECONDS = 1.0  # how often idle timeouts are checked (their precision)
_ALIVE_CHECK_SECONDS = 10.0  # how often a waiting thread checks that the pump still runs


class _Watch:
    """One waiting thread's socket, callback and outcome."""

    __slots__ = ("sock", "on_data", "idle_timeout", "wake_at", "last_read", "error", "done")

    def __init__(
        self, sock: socket.socket, on_data: Callable[[bytes], bool], idle_timeout: float, wake_at: float | None
    ):
        self.sock = sock
        self.on_data = on_data
        self.idle_timeout = idle_timeout
        self.wake_at = wake_at
        self.last_read = time.monotonic()
        self.error: BaseException | None = None
        self.done = threading.Lock()
        self.done.acquire()  # released by the pump when the watch ends


class ReadPump:
    """One per process; thread-safe. Its thread starts on first use (also after a fork)."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[_Watch] = queue.SimpleQueue()
        self._thread = LazyThread(self._loop, "read-pump", before_start=self._open_selector)
        self._selector: selectors.BaseSelector | None = None
        self._wake_read = self._wake_write = -1

    def wait(
        self,
        sock: socket.socket,
        on_data: Callable[[bytes], bool],
        idle_timeout: float,
        wake_at: float | None = None,
    ) -> None:
        """Feed what arrives on `sock` to `on_data` until it returns False or the connection closes (it gets b""
        then), or until `wake_at` (time.monotonic(); to within a second), and return. The socket is non-blocking
        meanwhile and gets its previous timeout back.

        Raises:
            TimeoutError: nothing arrived for `idle_timeout` seconds.
            OSError: reading the socket failed.
            Exception: whatever `on_data` raised.
        """
        watch = _Watch(sock, on_data, idle_timeout, wake_at)
        previous_timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            self._thread.ensure()
            self._requests.put(watch)
            self._wake()
            while not watch.done.acquire(timeout=_ALIVE_CHECK_SECONDS):
                if not self._thread.running():
                    raise RuntimeError("the read pump stopped")
        finally:
            sock.settimeout(previous_timeout)
        if watch.error is not None:
            raise watch.error

    # --- the pump's thread ------------------------------------------------------------------------------------

    def _open_selector(self) -> None:
        """A selector and a wake-up pipe for a new pump thread (a forked worker's own, too)."""
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def _loop(self) -> None:
        """Serve until something unexpected fails the pump (logged and counted as every background loop's
        failure): the watches it held end with an error their threads raise, and the pump serves new ones."""
        selector = self._selector
        while True:
            guarded(lambda: self._serve(selector), "read_pump", pause=0.1)
            for key in list(selector.get_map().values()):
                if key.data is not None:
                    self._end(selector, key.data, RuntimeError("the read pump failed"))

    def _serve(self, selector: selectors.BaseSelector) -> None:
        next_sweep = time.monotonic() + _SWEEP_SECONDS
        while True:
            for key, _ in selector.select(_SWEEP_SECONDS):
                if key.data is None:
                    self._take_requests(selector)
                else:
                    self._read(selector, key.data)
            now = time.monotonic()
            if now >= next_sweep:
                self._expire_idle(selector, now)
                next_sweep = now + _SWEEP_SECONDS

    def _take_requests(self, selector: selectors.BaseSelector) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                watch = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                selector.register(watch.sock, selectors.EVENT_READ, watch)
            except (OSError, ValueError) as exc:  # closed meanwhile
                self._end(None, watch, exc)

    def _read(self, selector: selectors.BaseSelector, watch: _Watch) -> None:
        sock = watch.sock
        try:
            while True:
                data = sock.recv(READ_SIZE)
                watch.last_read = time.monotonic()
                if not watch.on_data(data) or not data:
                    self._end(selector, watch)
                    return
                # A TLS record longer than one read leaves decrypted bytes that the selector cannot see.
                if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                    return
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return  # nothing to read after all (or only part of a TLS record)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, which raises it
            self._end(selector, watch, exc)

    def _expire_idle(self, selector: selectors.BaseSelector, now: float) -> None:
        for key in list(selector.get_map().values()):
            watch = key.data
            if watch is None:
                continue
            if now - watch.last_read > watch.idle_timeout:
                if _readable(watch.sock):
                    continue  # bytes wait unread (this process was stalled, a GC pause or a SIGSTOP): read first
                self._end(selector, watch, TimeoutError(f"nothing arrived for {watch.idle_timeout:g}s"))
            elif watch.wake_at is not None and now >= watch.wake_at:
                self._end(selector, watch)

    @staticmethod
    def _end(selector: selectors.BaseSelector | None, watch: _Watch, error: BaseException | None = None) -> None:
        if selector is not None:
            try:
                selector.unregister(watch.sock)
            except (KeyError, ValueError):
                pass
        watch.error = error
        watch.done.release()


def _readable(sock: socket.socket) -> bool:
    """Whether bytes wait on `sock` now: what arrived while the process could not read is no idle link."""
    try:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False
