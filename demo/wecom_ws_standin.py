"""A WeCom long-connection stand-in: the AI-bot WebSocket server (docs/protocol.md) on loopback.

It plays what the live service was seen doing: `aibot_subscribe` acked (853000 for a wrong bot_id or secret, the
socket left open), one connection per bot (a second subscriber makes the server send the first a
`disconnected_event` and close it a little later), `ping` acked, every stream frame acked, 846605 for a req_id
that is not the connection's, 846608 for a frame past the stream's window, 846609 for anything but a subscription
on a socket WeCom no longer counts as subscribed (`unsubscribe`), 6000 for a proactive send while a stream of that
chat is still open (and whatever errcodes a test queues with `refuse_sends`), WeCom's per-chat limits on proactive
sends (`send_limit`; over them a refusal), and pings left unanswered while `answer_pings` is off (a dead link).
For the fault campaign: a connection dropped with no event (`drop`), stream frames shown but neither their acks nor
pongs sent back while `acks_lost` is on, stream frames acked `ack_delay` seconds late, proactive sends taken but
their acks never sent back while `send_acks_lost` is on, and every proactive send refused while `busy_errcode` is
set.
Tests deliver messages and events to whichever connection holds a bot, and read back the frames each req_id got.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field

import orjson
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from demo.wecom_simulator import template_card_event

BAD_CREDENTIALS, DEAD_REQ_ID, STREAM_EXPIRED, NOT_SUBSCRIBED = 853000, 846605, 846608, 846609
COMMAND_CONFLICT = 6000
OVER_LIMIT = 45009  # WeCom's "over the frequency limit"
INVALID_UPLOAD = 40009  # a stand-in's code for an upload WeCom would refuse
UPLOAD_CAPS = {"image": 10 * 2**20, "file": 20 * 2**20, "voice": 2 * 2**20, "video": 10 * 2**20}


@dataclass
class _Delivery:
    """A callback the server sent: on which connection, when, and the frames answered on its req_id."""

    connection: ServerConnection
    at: float
    frames: list[dict] = field(default_factory=list)
    welcome: dict | None = None
    update: dict | None = None  # the answer to a template_card_event (aibot_respond_update_msg)


class WeComWebSocketStandIn:
    def __init__(
        self,
        bots: dict[str, str],
        window_seconds: float = 360.0,
        kick_close_delay: float = 0.5,
        stamp_frames: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.host = host
        self.bots = dict(bots)  # bot_id -> secret
        self.stamp_frames = stamp_frames  # keep when each frame arrived, as `_received_at` (for benchmarks)
        self.window_seconds = window_seconds
        self.kick_close_delay = kick_close_delay
        self.holders: dict[str, ServerConnection] = {}  # bot_id -> its subscribed connection
        self.subscribes: list[tuple[str, float]] = []  # (bot_id, when) of every accepted subscription
        self.refused: list[str] = []
        self.connections = 0  # sockets ever opened to the stand-in
        self.deliveries: dict[str, _Delivery] = {}  # req_id -> delivery
        self.proactive: list[dict] = []  # aibot_send_msg bodies
        self.media: dict[str, dict] = {}  # media_id -> {type, filename, data, chunks}: uploads finished
        self._uploads: dict[str, dict] = {}  # upload_id -> an upload in progress
        self.pings = 0
        self.answer_pings = True  # off: pings get no answer (a link that died without closing)
        self.acks_lost = False  # on: stream frames are shown, but neither their acks nor pongs come back
        self.busy_errcode = 0  # while set, every proactive send is refused with it (WeCom busy)
        self.send_acks_lost = False  # on: a proactive send is taken (its user has it), and its ack never comes back
        self.ack_delay = 0.0  # seconds between showing a stream frame and acking it (WeCom's: about 0.3 s)
        self.refuse_sends: list[int] = []  # errcodes the next proactive sends get, in order
        self.send_limit: tuple[int, float] = (30, 60.0)  # proactive sends a chat may get per that many seconds
        self.refused_sends: list[tuple[dict, int]] = []  # (body, errcode) of every proactive send refused
        self._sends_by_chat: dict[str, list[float]] = {}
        self._loop = asyncio.new_event_loop()
        self._server = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = port

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self) -> WeComWebSocketStandIn:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main():
            async with serve(self._connection, self.host, self.port) as server:
                self._server = server
                self.port = server.sockets[0].getsockname()[1]
                self._ready.set()
                await server.wait_closed()

        self._loop.run_until_complete(main())

    # --- what tests do ---------------------------------------------------------------------------------------

    def subscribed(self, bot_id: str) -> int:
        """How many open connections hold `bot_id` now (the server allows one)."""
        connection = self.holders.get(bot_id)
        return 1 if connection is not None and connection.state.name == "OPEN" else 0

    def deliver_text(self, bot_id: str, content: str, userid: str = "alice", msgid: str | None = None) -> str:
        """Send an aibot_msg_callback with a text message to the bot's connection; returns its req_id."""
        body = _message(bot_id, userid, "text", {"content": content}, msgid)
        body["response_url"] = f"http://127.0.0.1:9/response/{secrets.token_hex(4)}"
        return self._deliver(bot_id, "aibot_msg_callback", body)

    def deliver_message(self, bot_id: str, msgtype: str, content: dict, userid: str = "alice") -> str:
        """Send an aibot_msg_callback of any msgtype (`content` under its name); returns its req_id."""
        return self._deliver(bot_id, "aibot_msg_callback", _message(bot_id, userid, msgtype, content))

    def deliver_image(self, bot_id: str, url: str, aeskey: str, userid: str = "alice") -> str:
        """Send an image message whose medium (at `url`, encrypted with its own `aeskey`) the bot must fetch."""
        body = _message(bot_id, userid, "image", {"url": url, "aeskey": aeskey})
        return self._deliver(bot_id, "aibot_msg_callback", body)

    def deliver_event(self, bot_id: str, eventtype: str, userid: str = "alice", payload: dict | None = None) -> str:
        """Send an aibot_event_callback (its `payload` under the event type's name); returns its req_id."""
        event = {"eventtype": eventtype, **({eventtype: payload} if payload is not None else {})}
        return self._deliver(bot_id, "aibot_event_callback", _message(bot_id, userid, "event", event))

    def deliver_card_click(
        self, bot_id: str, card: dict, action: str = "", userid: str = "alice", selected: dict | None = None
    ) -> str:
        """`userid` taps `card` (demo/wecom_simulator.py, template_card_event); returns the event's req_id."""
        click = template_card_event(card, action, selected)
        return self.deliver_event(bot_id, "template_card_event", userid, payload=click)

    def updated(self, req_id: str, timeout: float = 5.0) -> dict | None:
        """The card update a click got on its req_id (waiting for it), or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            delivery = self.deliveries.get(req_id)
            if delivery is not None and delivery.update is not None:
                return delivery.update
            time.sleep(0.02)
        return None

    def cards(self, req_id: str) -> list[dict]:
        """The template cards that rode on a message's stream frames."""
        return [frame["template_card"] for frame in self.frames(req_id) if "template_card" in frame]

    def unsubscribe(self, bot_id: str) -> None:
        """WeCom stops counting the bot's connection as subscribed, the socket left open (846609 from now on)."""
        self.holders.pop(bot_id, None)

    def kick(self, bot_id: str) -> None:
        """A subscriber that is not the gateway (an old deployment, a laptop) takes the bot."""
        asyncio.run_coroutine_threadsafe(self._kick(bot_id), self._loop).result(5)

    def drop(self, bot_id: str) -> None:
        """The bot's connection breaks: its socket is closed with no event and no close frame."""
        asyncio.run_coroutine_threadsafe(self._drop(bot_id), self._loop).result(5)

    def frames(self, req_id: str) -> list[dict]:
        delivery = self.deliveries.get(req_id)
        return list(delivery.frames) if delivery else []

    def welcome(self, req_id: str) -> dict | None:
        delivery = self.deliveries.get(req_id)
        return delivery.welcome if delivery else None

    def final(self, req_id: str, timeout: float = 30.0) -> dict | None:
        """The frame with finish=true answered on `req_id` (waiting for it), or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for body in self.frames(req_id):
                if body.get("stream", {}).get("finish"):
                    return body
            time.sleep(0.05)
        return None

    def _deliver(self, bot_id: str, cmd: str, body: dict) -> str:
        req_id = f"{cmd}_{uuid.uuid4().hex[:12]}"
        future = asyncio.run_coroutine_threadsafe(self._push(bot_id, cmd, req_id, body), self._loop)
        future.result(5)
        return req_id

    # --- the server ------------------------------------------------------------------------------------------

    async def _push(self, bot_id: str, cmd: str, req_id: str, body: dict) -> None:
        connection = self.holders.get(bot_id)
        if connection is None:
            raise RuntimeError(f"no connection holds bot {bot_id}")
        self.deliveries[req_id] = _Delivery(connection, time.monotonic())
        await connection.send(_dump({"cmd": cmd, "headers": {"req_id": req_id}, "body": body}))

    async def _kick(self, bot_id: str) -> None:
        connection = self.holders.pop(bot_id, None)
        if connection is not None:
            await self._disconnect(connection)

    async def _drop(self, bot_id: str) -> None:
        connection = self.holders.pop(bot_id, None)
        if connection is not None:
            connection.transport.abort()

    async def _disconnect(self, connection: ServerConnection) -> None:
        event = {"msgtype": "event", "event": {"eventtype": "disconnected_event"}}
        req_id = f"aibot_event_callback_{uuid.uuid4().hex[:12]}"
        try:
            await connection.send(_dump({"cmd": "aibot_event_callback", "headers": {"req_id": req_id}, "body": event}))
        except ConnectionClosed:
            return
        self._loop.call_later(self.kick_close_delay, lambda: asyncio.ensure_future(connection.close()))

    async def _connection(self, connection: ServerConnection) -> None:
        self.connections += 1
        try:
            async for text in connection:
                data = orjson.loads(text)
                await self._frame(connection, data)
        except ConnectionClosed:
            pass
        finally:
            for bot_id, holder in list(self.holders.items()):
                if holder is connection:
                    del self.holders[bot_id]

    async def _frame(self, connection: ServerConnection, data: dict) -> None:
        cmd = data.get("cmd")
        req_id = (data.get("headers") or {}).get("req_id", "")
        body = data.get("body") or {}
        errcode, answer = 0, None
        if cmd == "aibot_subscribe":
            bot_id = body.get("bot_id", "")
            if self.bots.get(bot_id) != body.get("secret"):
                self.refused.append(bot_id)
                errcode = BAD_CREDENTIALS  # and the socket stays open
            else:
                previous = self.holders.get(bot_id)
                self.holders[bot_id] = connection
                self.subscribes.append((bot_id, time.monotonic()))
                if previous is not None and previous is not connection:
                    await self._disconnect(previous)
        elif connection not in self.holders.values():
            errcode = NOT_SUBSCRIBED
        elif cmd == "ping":
            self.pings += 1
            if not self.answer_pings or self.acks_lost:
                return
        elif cmd in ("aibot_respond_msg", "aibot_respond_welcome_msg", "aibot_respond_update_msg"):
            delivery = self.deliveries.get(req_id)
            if delivery is None or delivery.connection is not connection:
                errcode = DEAD_REQ_ID
            elif cmd == "aibot_respond_welcome_msg":
                delivery.welcome = body
            elif cmd == "aibot_respond_update_msg":
                delivery.update = body
            elif time.monotonic() - delivery.at > self.window_seconds:
                errcode = STREAM_EXPIRED
            else:
                delivery.frames.append({**body, "_received_at": time.time()} if self.stamp_frames else body)
        elif cmd == "aibot_send_msg":
            errcode = self._proactive(body)
        elif cmd.startswith("aibot_upload_media_"):
            errcode, answer = self._upload(cmd, body)
        ack = {"headers": {"req_id": req_id}, "errcode": errcode, "errmsg": "ok" if not errcode else "refused"}
        if answer:
            ack["body"] = answer
        if self.acks_lost and cmd == "aibot_respond_msg":
            return
        if self.send_acks_lost and cmd == "aibot_send_msg" and not errcode:
            return
        if self.ack_delay and cmd == "aibot_respond_msg":
            asyncio.ensure_future(self._ack_later(connection, ack))
            return
        await connection.send(_dump(ack))

    async def _ack_later(self, connection: ServerConnection, ack: dict) -> None:
        await asyncio.sleep(self.ack_delay)
        try:
            await connection.send(_dump(ack))
        except ConnectionClosed:
            pass

    def _proactive(self, body: dict) -> int:
        """An aibot_send_msg: taken (0), or refused as a test queued, or over the chat's limit."""
        chat = str(body.get("chatid", ""))
        limit, seconds = self.send_limit
        now = time.monotonic()
        recent = [t for t in self._sends_by_chat.get(chat, []) if now - t < seconds]
        errcode = self.refuse_sends.pop(0) if self.refuse_sends else self.busy_errcode
        errcode = errcode or (OVER_LIMIT if len(recent) >= limit else 0)
        self._sends_by_chat[chat] = recent + [now]  # WeCom counts what it refuses too
        if errcode:
            self.refused_sends.append((body, errcode))
        else:
            self.proactive.append({**body, "_received_at": time.time()} if self.stamp_frames else body)
        return errcode

    def _upload(self, cmd: str, body: dict) -> tuple[int, dict | None]:
        """The three steps of a media upload (init -> upload_id, chunks of at most 512 KB, finish -> media_id), with
        the checks WeCom makes: chunk count and size, the total size and the MD5."""
        if cmd == "aibot_upload_media_init":
            if not 1 <= int(body.get("total_chunks") or 0) <= 100 or body.get("type") not in UPLOAD_CAPS:
                return INVALID_UPLOAD, None
            if int(body.get("total_size") or 0) > UPLOAD_CAPS[body["type"]]:
                return INVALID_UPLOAD, None
            upload_id = uuid.uuid4().hex
            self._uploads[upload_id] = {**body, "chunks": {}}
            return 0, {"upload_id": upload_id}
        upload = self._uploads.get(body.get("upload_id", ""))
        if upload is None:
            return INVALID_UPLOAD, None
        if cmd == "aibot_upload_media_chunk":
            data = base64.b64decode(body.get("base64_data") or "")
            if len(data) > 512 * 1024:
                return INVALID_UPLOAD, None
            upload["chunks"][int(body.get("chunk_index", -1))] = data
            return 0, None
        data = b"".join(upload["chunks"][i] for i in sorted(upload["chunks"]))
        whole = len(upload["chunks"]) == upload["total_chunks"] and len(data) == upload["total_size"]
        if not whole or hashlib.md5(data).hexdigest() != upload["md5"]:
            return INVALID_UPLOAD, None
        media_id = uuid.uuid4().hex
        del self._uploads[body["upload_id"]]
        self.media[media_id] = {"type": upload["type"], "filename": upload["filename"], "data": data}
        self.media[media_id]["chunks"] = len(upload["chunks"])
        return 0, {"media_id": media_id}


def _message(bot_id: str, userid: str, msgtype: str, content: dict, msgid: str | None = None) -> dict:
    """A 1:1 message (or event) body as WeCom sends it, its content under its msgtype."""
    return {
        "msgid": msgid or uuid.uuid4().hex,
        "aibotid": bot_id,
        "chattype": "single",
        "from": {"userid": userid},
        "msgtype": msgtype,
        msgtype: content,
    }


def _dump(data: dict) -> str:
    return orjson.dumps(data).decode()
