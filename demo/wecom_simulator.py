"""A WeCom stand-in on the sending side: encrypts callbacks, posts them, checks and decrypts the replies, and
polls a stream about once a second like WeCom does, until `finish:true` or the 6-minute window.

Used by the tests (with a short poll interval) and by people: `python -m demo.wecom_simulator` chats with a
running gateway in the terminal and prints the growing answer.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx
import orjson

from demo.http_server import Conn, Request, StandInServer
from services.wecom.crypto import WeComCrypto

WECOM_POLL_WINDOW = 360.0


class ReplyError(Exception):
    """The gateway answered with something WeCom would reject (status, signature, shape)."""


@dataclass
class Conversation:
    """One message and the polls that followed it."""

    stream_id: str
    frames: list[dict] = field(default_factory=list)
    polls: int = 0
    dropped_polls: int = 0  # polls whose connection broke before a reply (WeCom just polls again)
    cards: list[dict] = field(default_factory=list)  # template cards that rode on the stream (WeCom takes one)

    @property
    def last(self) -> dict:
        return self.frames[-1]["stream"]

    @property
    def text(self) -> str:
        return self.last.get("content", "")

    @property
    def finished(self) -> bool:
        return bool(self.last.get("finish"))

    def contents(self) -> list[str]:
        return [f["stream"].get("content", "") for f in self.frames]


class WeComInbox:
    """WeCom's side of the active-reply and media URLs, served locally: `response_url` accepts one message per
    code (a second use is refused; until `busy_until`, every post gets HTTP 503 and is not taken), and
    `/media/<name>` serves files encrypted with the bot key, like WeCom's COS."""

    def __init__(self, crypto: WeComCrypto):
        self.crypto = crypto
        self.messages: dict[str, list[dict]] = {}
        self.media: dict[str, bytes] = {}
        self.media_headers: dict[str, dict[str, str]] = {}
        self.on_message: Callable[[dict], None] | None = None
        self.busy_until = 0.0  # time.time() before which WeCom is busy: posts are answered 503
        self.busy_posts = 0  # posts answered so
        self.server = StandInServer(self.handle)
        self._lock = threading.Lock()

    def start(self) -> WeComInbox:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def new_response_url(self) -> str:
        return f"{self.server.url}/cgi-bin/aibot/response?response_code={secrets.token_hex(8)}"

    def host(self, data: bytes, filename: str | None = None, encrypt: bool = True) -> str:
        """Serve `data` (encrypted with the bot key, as WeCom does) and return its URL."""
        body = self.crypto.encrypt_media(data) if encrypt else data
        name = secrets.token_hex(6)
        self.media[name] = body
        if filename:
            self.media_headers[name] = {"Content-Disposition": f"attachment; filename*=UTF-8''{quote(filename)}"}
        return f"{self.server.url}/media/{name}?sign={secrets.token_hex(4)}"

    def received(self, response_url: str) -> list[dict]:
        code = response_url.rsplit("response_code=", 1)[-1]
        return self.messages.get(code, [])

    def wait_for(self, response_url: str, timeout: float = 5.0) -> dict | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received(response_url)
            if got:
                return got[0]
            time.sleep(0.02)
        return None

    async def handle(self, request: Request, conn: Conn) -> None:
        if request.method == "POST" and request.path == "/cgi-bin/aibot/response":
            code = request.query.get("response_code", "")
            if time.time() < self.busy_until:
                self.busy_posts += 1
                await conn.send(503, {"errcode": -1, "errmsg": "system busy"})
                return
            with self._lock:
                used = code in self.messages
                body = orjson.loads(request.body) if request.body else {}
                self.messages.setdefault(code, []).append(body)
            if used:
                await conn.send(200, {"errcode": 600001, "errmsg": "response_code already used"})
                return
            if self.on_message:
                self.on_message(body)
            await conn.send(200, {"errcode": 0, "errmsg": "ok"})
        elif request.method == "GET" and request.path.startswith("/media/"):
            name = request.path.rsplit("/", 1)[-1]
            if name not in self.media:
                await conn.send(404, {"errcode": 404, "errmsg": "expired"})
                return
            await conn.send(
                200, self.media[name], content_type="application/octet-stream", headers=self.media_headers.get(name)
            )
        else:
            await conn.send(404, {"errcode": 404})


def template_card_event(card: dict, action: str = "", selected: dict[str, str] | None = None) -> dict:
    """What WeCom sends when a user taps `card`: the button whose key ends with `#<action>` (the first without
    one), or for a card with selectors its submit button; with every selector's option as WeCom reports it (the
    one `selected` names, {question_key: option id or text}, else the card's selected one, else its first). A
    `selected` entry the card does not offer is sent as given (a stale or forged click)."""
    if card.get("card_type") == "multiple_interaction":
        key = card["submit_button"]["key"]
    else:
        keys = [b["key"] for b in card["button_list"]]
        key = next((k for k in keys if action and k.endswith(f"#{action}")), keys[0])
    event = {"card_type": card.get("card_type", ""), "event_key": key, "task_id": card.get("task_id", "")}
    wanted = dict(selected or {})
    selectors = card.get("select_list") or ([card["button_selection"]] if card.get("button_selection") else [])
    chosen = {}
    for selector in selectors:
        options = {option["text"]: option["id"] for option in selector["option_list"]}
        want = wanted.pop(selector["question_key"], None)
        first = selector["option_list"][0]["id"] if selector["option_list"] else ""
        default = selector.get("selected_id") or first
        chosen[selector["question_key"]] = default if want is None else options.get(want, want)
    chosen |= wanted
    items = [{"question_key": q, "option_ids": {"option_id": [o]}} for q, o in chosen.items()]
    if items:
        event["selected_items"] = {"selected_item": items}
    return event


class WeComSimulator:
    """Talks to one gateway (or, with `urls`, spreads requests over several replicas) as WeCom would."""

    def __init__(
        self,
        urls: str | list[str],
        token: str,
        encoding_aes_key: str,
        *,
        callback_path: str = "/wecom/callback",
        aibotid: str = "demo-bot",
        poll_interval: float = 1.0,
        timeout: float = 10.0,
    ):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.crypto = WeComCrypto(token, encoding_aes_key, "")
        self.callback_path = callback_path
        self.aibotid = aibotid
        self.poll_interval = poll_interval
        # Idle connections are dropped well before gunicorn's keepalive (5 s) closes them: at httpx's default, 5 s
        # as well, a poll could go out on a connection the replica was closing, and get no response at all.
        self.http = httpx.Client(timeout=timeout, trust_env=False, limits=httpx.Limits(keepalive_expiry=2.0))
        self._next_url = itertools.cycle(range(len(self.urls)))
        self.inbox = WeComInbox(self.crypto).start()

    def close(self) -> None:
        self.http.close()
        self.inbox.stop()

    # --- payloads -----------------------------------------------------------------------------------------

    def text_message(
        self, content: str, userid: str = "alice", chatid: str = "", msgid: str | None = None, quote: dict | None = None
    ) -> dict:
        payload = self._common(userid, chatid, msgid)
        payload.update({"msgtype": "text", "text": {"content": content}})
        if quote:
            payload["quote"] = quote
        return payload

    def message(
        self, msgtype: str, body: dict, userid: str = "alice", chatid: str = "", msgid: str | None = None
    ) -> dict:
        payload = self._common(userid, chatid, msgid)
        payload.update({"msgtype": msgtype, msgtype: body})
        return payload

    def poll_message(self, stream_id: str, userid: str = "alice", chatid: str = "") -> dict:
        payload = self._common(userid, chatid, None)
        payload.pop("response_url", None)
        payload.update({"msgtype": "stream", "stream": {"id": stream_id}})
        return payload

    def event_message(self, eventtype: str, payload: dict | None = None, userid: str = "alice") -> dict:
        message = self._common(userid, "", None)
        message.pop("response_url", None)
        message.update(
            {
                "msgtype": "event",
                "create_time": int(time.time()),
                "event": {"eventtype": eventtype, eventtype: payload or {}},
            }
        )
        return message

    def card_click(
        self,
        card: dict,
        action: str = "",
        userid: str = "alice",
        chatid: str = "",
        selected: dict[str, str] | None = None,
    ) -> dict:
        """A `template_card_event` callback: `userid` taps the button of `action` on `card` (see
        template_card_event)."""
        event = template_card_event(card, action, selected)
        message = self._common(userid, chatid, None)
        message.pop("msgid", None)
        message.update(
            {"msgtype": "event", "create_time": int(time.time()), "event": {"eventtype": "template_card_event"}}
        )
        message["event"]["template_card_event"] = event
        return message

    def _common(self, userid: str, chatid: str, msgid: str | None) -> dict:
        payload = {
            "msgid": msgid or secrets.token_hex(16),
            "aibotid": self.aibotid,
            "chattype": "group" if chatid else "single",
            "from": {"userid": userid},
            "response_url": self.inbox.new_response_url(),
        }
        if chatid:
            payload["chatid"] = chatid
        return payload

    # --- transport ----------------------------------------------------------------------------------------

    def url(self, replica: int | None = None) -> str:
        index = next(self._next_url) if replica is None else replica
        return self.urls[index].rstrip("/") + self.callback_path

    def envelope(self, payload: dict, timestamp: int | None = None, nonce: str | None = None) -> tuple[dict, bytes]:
        """(query params, body) of a signed, encrypted callback for `payload`."""
        timestamp = int(time.time()) if timestamp is None else timestamp
        nonce = nonce or secrets.token_hex(8)
        encrypted = self.crypto.encrypt(orjson.dumps(payload).decode())
        query = {
            "msg_signature": self.crypto.sign(str(timestamp), nonce, encrypted),
            "timestamp": str(timestamp),
            "nonce": nonce,
        }
        return query, orjson.dumps({"encrypt": encrypted})

    def post(self, payload: dict, replica: int | None = None) -> httpx.Response:
        """POST a callback and return the raw HTTP response."""
        query, body = self.envelope(payload)
        return self.http.post(
            self.url(replica), params=query, content=body, headers={"Content-Type": "application/json"}
        )

    def send(self, payload: dict, replica: int | None = None, timestamp: int | None = None) -> dict | None:
        """POST a callback and return the decrypted reply (None for an empty reply). `timestamp` (epoch seconds):
        when WeCom sent it, if not now (a callback read late).

        Raises:
            ReplyError: a non-200 status, a bad reply signature or nonce, or a reply that does not decrypt.
        """
        query, body = self.envelope(payload, timestamp)
        response = self.http.post(
            self.url(replica), params=query, content=body, headers={"Content-Type": "application/json"}
        )
        if response.status_code != 200:
            raise ReplyError(f"HTTP {response.status_code}: {response.text[:300]}")
        if not response.content:
            return None
        return self.open_reply(response.json(), query["nonce"])

    def open_reply(self, envelope: dict, nonce: str) -> dict:
        """Check a reply envelope the way WeCom would and decrypt it."""
        try:
            encrypted = envelope["encrypt"]
            timestamp = str(envelope["timestamp"])
            if envelope["nonce"] != nonce:
                raise ReplyError("reply nonce differs from the request's")
            self.crypto.check_signature(envelope["msgsignature"], timestamp, nonce, encrypted)
            return orjson.loads(self.crypto.decrypt(encrypted))
        except (KeyError, TypeError, ValueError) as exc:
            raise ReplyError(f"malformed reply: {exc}") from exc

    def verify_url(self, replica: int | None = None) -> httpx.Response:
        """WeCom's GET URL check with a random echostr; returns the raw response."""
        echo = secrets.token_hex(12)
        timestamp, nonce = str(int(time.time())), secrets.token_hex(8)
        echostr = self.crypto.encrypt(echo)
        query = {
            "msg_signature": self.crypto.sign(timestamp, nonce, echostr),
            "timestamp": timestamp,
            "nonce": nonce,
            "echostr": echostr,
        }
        response = self.http.get(self.url(replica), params=query)
        response.expected_echo = echo  # type: ignore[attr-defined]
        return response

    # --- conversations ------------------------------------------------------------------------------------

    def follow(
        self,
        first_reply: dict,
        userid: str = "alice",
        chatid: str = "",
        window: float = WECOM_POLL_WINDOW,
        on_frame: Callable[[dict], None] | None = None,
    ) -> Conversation:
        """Poll the stream of `first_reply` until finish or the window, like WeCom."""
        stream = first_reply["stream"]
        conversation = Conversation(stream_id=stream["id"], frames=[first_reply])
        if on_frame:
            on_frame(first_reply)
        deadline = time.monotonic() + window
        while not conversation.finished and time.monotonic() < deadline:
            time.sleep(self.poll_interval)
            try:
                reply = self.send(self.poll_message(conversation.stream_id, userid, chatid))
            except httpx.TransportError:
                # A kept-alive connection the server closed as the poll went out (a worker replaced on HUP or
                # draining): no reply, and WeCom polls again a second later. A reply, even a 503, is checked.
                conversation.dropped_polls += 1
                continue
            conversation.polls += 1
            if (
                reply is None
                or reply.get("msgtype") not in ("stream", "stream_with_template_card")
                or reply["stream"].get("id") != conversation.stream_id
            ):
                raise ReplyError(f"unexpected poll reply: {reply!r}")
            if "template_card" in reply:
                if conversation.cards:
                    raise ReplyError("a second template card for one message (WeCom refuses it)")
                conversation.cards.append(reply["template_card"])
            conversation.frames.append(reply)
            if on_frame:
                on_frame(reply)
        return conversation

    def ask(self, content: str, userid: str = "alice", chatid: str = "", **kwargs) -> Conversation:
        """Send a text message and follow its stream to the end."""
        first = self.send(self.text_message(content, userid, chatid))
        if first is None:
            raise ReplyError("empty reply to a text message")
        return self.follow(first, userid, chatid, **kwargs)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from config.bots import load_bots
    from config.settings import DEMO_ENV_FILES, load_settings
    from demo.terminal_chat import chat_loop

    settings = load_settings(env_files=DEMO_ENV_FILES)
    bots = {bot.name: bot for bot in load_bots(settings) if bot.wecom.mode == "callback"}
    parser = argparse.ArgumentParser(description="Chat with a running gateway as WeCom would.")
    parser.add_argument("--bot", default=next(iter(bots)), choices=sorted(bots), help="the callback bot to chat with")
    parser.add_argument(
        "--url", default=f"http://127.0.0.1:{settings.port}", help="gateway base URL(s), comma separated"
    )
    parser.add_argument("--user", default="alice", help="WeCom userid to send as")
    parser.add_argument("--group", default="", help="chatid: send as a group message")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    options = parser.parse_args(argv)
    bot = bots[options.bot]
    simulator = WeComSimulator(
        options.url.split(","),
        bot.wecom.token,
        bot.wecom.encoding_aes_key,
        callback_path=bot.wecom.callback_path,
        aibotid=f"demo-{bot.name}",
        poll_interval=options.poll_interval,
    )
    chat_loop(simulator, options.user, options.group)


if __name__ == "__main__":
    main()
