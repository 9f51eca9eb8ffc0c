"""One WebSocket connection to WeCom for one bot: subscribe, send frames and match their acks by req_id, hand the
server's callbacks to the holder, and say why it ended. Built on the `websockets` library's sync client.

The reader thread only reads: what a frame asks for runs elsewhere, so no Redis call (nor a wait for a Redis
replica, services/replication.py) ever holds up the next frame. A message or event runs on a small pool (each is
independent, as callbacks are in callback mode); the acks' callbacks run on one thread, in the order the acks came
(what a bubble shows is recorded in order)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from services.longconn import frames

logger = logging.getLogger(__name__)

Ack = Callable[[dict], None]


class SubscribeRefused(Exception):
    """WeCom refused the subscription (853000: wrong bot_id or secret)."""

    def __init__(self, errcode: int, errmsg: str):
        super().__init__(f"subscribe refused: errcode {errcode} ({errmsg})")
        self.errcode = errcode


class SessionFailed(Exception):
    """The connection could not be opened or broke before it was subscribed."""


KICKED, CLOSED, STOPPED = "kicked", "closed", "stopped"
RESUBSCRIBE_SECONDS = 5.0
# After a kick (`disconnected_event`), how long the socket is still read for the acks of frames sent before it: WeCom
# answers each, shown (0) or refused (846609, it came after the kick), before it closes the socket (2 s to minutes
# later). A frame closed on unanswered would be taken for shown, and a final one leave its bubble spinning.
KICK_SETTLE_SECONDS = 1.0
CALLBACK_THREADS = 16  # messages and events of one connection handled at once, off the reader (they wait on Redis)


class Session:
    """A subscribed connection. `run()` reads until the connection ends and returns why: KICKED (another subscriber
    took the bot: `disconnected_event`), CLOSED (the connection broke), STOPPED (we closed it)."""

    def __init__(self, url: str, bot_id: str, secret: str, on_callback: Callable[[dict], None], timeout: float = 10.0):
        self.url = url
        self.bot_id = bot_id
        self.secret = secret
        self.on_callback = on_callback
        self.timeout = timeout
        self._ws: ClientConnection | None = None
        self._acks: dict[str, deque[tuple[Ack | None, int]]] = {}  # req_id -> its frames' (callback, number)
        self._sent = 0  # frames sent, each numbered in order
        self._read_through = 0  # the highest number of a frame WeCom acked: it read every frame up to it
        self._over = False  # the connection ended (run returned)
        self._lock = threading.Lock()
        self._stopped = False
        self._kicked = False  # a disconnected_event came: nothing more is sent, the acks still due are read
        self._unanswered = 0  # frames sent whose acks have not been handled yet
        self._answered = threading.Condition(self._lock)
        self._callbacks = ThreadPoolExecutor(CALLBACK_THREADS, thread_name_prefix=f"wecom-ws-in-{bot_id[:12]}")
        self._acks_in_order = ThreadPoolExecutor(1, thread_name_prefix=f"wecom-ws-acks-{bot_id[:12]}")
        self._resubscribed_at = -RESUBSCRIBE_SECONDS

    def open(self) -> None:
        """Connect and subscribe.

        Raises:
            SubscribeRefused: WeCom answered the subscription with an errcode.
            SessionFailed: no connection, or no answer to the subscription within the timeout.
        """
        try:
            # legacy=True: the connection outlives this call (run() reads it, close() ends it), not a `with` block
            self._ws = connect(
                self.url, open_timeout=self.timeout, close_timeout=2, max_size=4 * 1024 * 1024, legacy=True
            )
            req_id, text = frames.subscribe(self.bot_id, self.secret)
            self._ws.send(text)
            while True:
                data = frames.parse(self._ws.recv(timeout=self.timeout))
                if data is not None and frames.req_id_of(data) == req_id:
                    break
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
            self.close()
            raise SessionFailed(f"{type(exc).__name__}: {exc}") from None
        errcode = int(data.get("errcode") or 0)
        if errcode:
            self.close()  # WeCom leaves the socket open after 853000: read the ack, then close it ourselves
            raise SubscribeRefused(errcode, str(data.get("errmsg") or ""))

    def send(self, text: str, req_id: str = "", on_ack: Ack | None = None) -> int:
        """Send one frame; `on_ack(ack)` runs (in the reader's thread) when its ack arrives. Returns the frame's
        number on this connection (`received` tells later whether WeCom read it), 0 if it did not go out.

        Several frames share a req_id (every frame of one stream reply uses its message's), and an ack names only
        the req_id: the acks of one req_id are matched to its frames in the order they were sent, so a late ack
        (one that came after a later frame was sent) reaches its own frame's callback, not the later one's."""
        with self._lock:
            if self._kicked:
                return 0
            number = self._sent + 1
            waiting = self._acks.setdefault(req_id, deque()) if req_id else None
            if waiting is not None:
                waiting.append((on_ack, number))
                self._unanswered += 1
            try:
                self._ws.send(text)  # under the lock: the order sent is the order registered
            except (ConnectionClosed, OSError, AttributeError):
                if waiting is not None:
                    waiting.pop()
                    self._unanswered -= 1
                    if not waiting:
                        del self._acks[req_id]
                return 0
            self._sent = number
        return number

    def received(self, number: int) -> bool:
        """Whether WeCom read frame `number`: an ack came for it or for a frame sent after it (one socket, read in
        order), whatever became of its own ack."""
        with self._lock:
            return self._read_through >= number

    @property
    def ended(self) -> bool:
        """The connection is over: no ack still due on it will come (its reader stopped)."""
        return self._over

    def settle(self, timeout: float) -> bool:
        """Wait (up to `timeout` s) until every frame sent has had its ack handled: a holder handing the connection
        over first learns what the bubbles show. False if some were still unanswered."""
        with self._answered:
            return self._answered.wait_for(lambda: self._unanswered <= 0, timeout)

    def run(self) -> str:
        """Read frames until the connection ends; returns KICKED, CLOSED or STOPPED."""
        try:
            return self._read()
        finally:  # what was handed over still runs (a message taken is answered, an ack recorded)
            self._callbacks.shutdown(wait=False)
            self._acks_in_order.submit(self._end)  # after the callbacks of the acks that came
            self._acks_in_order.shutdown(wait=False)

    def _end(self) -> None:
        self._over = True

    def _read(self) -> str:
        settled_by = 0.0  # after a kick: when to stop waiting for the acks still due
        while True:
            if self._kicked:
                remaining = settled_by - time.monotonic()
                with self._lock:
                    unanswered = self._unanswered
                if unanswered <= 0 or remaining <= 0:
                    self.close()
                    return KICKED
            try:
                text = self._ws.recv(timeout=remaining if self._kicked else None)
            except TimeoutError:
                continue
            except (ConnectionClosed, OSError):
                if self._kicked:
                    return KICKED
                return STOPPED if self._stopped else CLOSED
            data = frames.parse(text) if isinstance(text, str) else None
            if data is None:
                continue
            cmd = data.get("cmd")
            if not cmd:
                if int(data.get("errcode") or 0) == frames.NOT_SUBSCRIBED and not self._kicked:
                    self._resubscribe()
                self._answer(frames.req_id_of(data), data)
                continue
            if cmd == frames.EVENT_CALLBACK and _event_type(data) == "disconnected_event":
                with self._lock:
                    self._kicked = True
                settled_by = time.monotonic() + KICK_SETTLE_SECONDS
                continue
            try:
                self._callbacks.submit(self._handle, data)
            except RuntimeError:  # closed meanwhile: the connection is over
                return STOPPED if self._stopped else CLOSED

    def _handle(self, data: dict) -> None:
        try:
            self.on_callback(data)
        except Exception:
            logger.exception("failed to handle a %s frame", data.get("cmd"))

    def _answer(self, req_id: str, ack: dict) -> None:
        """Have the callback of the oldest frame of `req_id` still waiting for its ack run (if it has one), after
        those of the acks before it."""
        with self._lock:
            waiting = self._acks.get(req_id)
            if not waiting:
                return
            on_ack, number = waiting.popleft()
            if not waiting:
                del self._acks[req_id]
        try:
            self._acks_in_order.submit(self._acknowledged, on_ack, ack, number)
        except RuntimeError:  # closed meanwhile: run it here
            self._acknowledged(on_ack, ack, number)

    def _acknowledged(self, on_ack: Ack | None, ack: dict, number: int) -> None:
        """Run a frame's ack callback; only then is it counted as read (`received`), so that the callbacks of the
        acks that came before it have run too."""
        try:
            if on_ack is not None:
                on_ack(ack)
        except Exception:
            logger.exception("failed to handle an ack")
        finally:
            with self._answered:
                self._unanswered -= 1
                self._read_through = max(self._read_through, number)
                self._answered.notify_all()

    def _resubscribe(self) -> None:
        """WeCom answered 846609: it no longer counts this socket as the bot's subscription (it happens, without a
        disconnected_event). Subscribe again on it, at most once per RESUBSCRIBE_SECONDS; a refusal ends the
        connection (the holder then reconnects through the lease)."""
        now = time.monotonic()
        if now - self._resubscribed_at < RESUBSCRIBE_SECONDS:
            return
        self._resubscribed_at = now
        logger.warning("WeCom says the connection is no longer subscribed (846609); subscribing again")
        req_id, text = frames.subscribe(self.bot_id, self.secret)

        def on_ack(ack: dict) -> None:
            if int(ack.get("errcode") or 0):
                logger.warning("subscribing again was refused (errcode %s); reconnecting", ack.get("errcode"))
                self.drop()
            else:
                logger.info("subscribed again")

        self.send(text, req_id, on_ack)

    def drop(self) -> None:
        """End a connection that no longer works (its pongs stopped, a subscription refused): `run` returns
        CLOSED, and the holder connects again through the lease."""
        if self._ws is not None:
            self._ws.close()

    def close(self) -> None:
        self._stopped = True
        if self._ws is not None:
            self._ws.close()


def _event_type(data: dict) -> str:
    body = data.get("body") if isinstance(data.get("body"), dict) else {}
    event = body.get("event") if isinstance(body.get("event"), dict) else {}
    return str(event.get("eventtype") or "")
