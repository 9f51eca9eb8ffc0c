"""The campaign's users: each sends a message, follows its bubble like WeCom (a poll about once a second, on any
replica, until it finishes or WeCom's window ends), and sends the next one. WeCom's own behaviour is played too: a
delivery that fails is retried on another replica, and some deliveries are repeated on another replica although
the first got through (WeCom retries when a reply is slow), on the long connection too (the same msgid in a frame
of its own). A long-connection bot's messages go down the WebSocket of whichever replica holds it (the WeCom
stand-in records every frame answered, and every proactive message).
Some messages get a Dify fault of their own: a slow first byte, a cut stream, a 5xx, a stalled stream, a 429 that
a retry gets past, a 503 on every try; some answers are longer than a bubble (the rest comes as a message of its
own); and load may arrive open-loop (`Arrivals`), not paced by the answers. A form bot's
answers pause halfway for an approval (Dify's Human Input node, after streamed text: the rest only in the run's
outputs, as Dify 1.14.2 has it), and the user taps the card when it comes, on any replica, tapping again if the tap
got no answer."""

from __future__ import annotations

import random
import secrets
import threading
import time
from dataclasses import dataclass

from bench.faults.answers import answer_text, sentence, sentences_in
from bench.faults.history import History
from demo import dify_apps as apps
from demo import dify_standin as d
from demo import openai_standin as o
from demo.dify_standin import DifyStandIn
from demo.openai_standin import OpenAIStandIn
from demo.wecom_simulator import WeComSimulator
from demo.wecom_ws_standin import WeComWebSocketStandIn

DIFY_FAULTS = ("slow", "cut", "http_500", "stalled", "refused_429", "unavailable_503")
# Dify faults that refuse requests before any run starts: `refused_429` its first (the gateway's retry gets the
# answer), `unavailable_503` every one (the user gets a note). Refused requests are no Dify calls (nothing ran).
_REFUSALS = {"refused_429": 1, "unavailable_503": 99}
# An OpenAI-compatible server's 5xx before its stream began is a refusal too (the gateway asks again: nothing was
# streamed); Dify's 500 is a call (its run may have started).
_OPENAI_REFUSALS = {**_REFUSALS, "http_500": 99}
# A long answer: sentences padded so that it outgrows one bubble (20 KiB), whose rest must come as a message.
LONG_SENTENCES, LONG_PADDING = (110, 140), "·" * 100


CHAT, CHATFLOW, FORM = "chat", "chatflow", "form"  # a bot's Dify app: its answers are runs; forms pause them
OPENAI = "openai"  # a bot answered by an OpenAI-compatible server: an answer is one completion, never resumed


@dataclass
class Bot:
    """One of the campaign's bots: how WeCom reaches it (callbacks through `simulator`, or the WebSocket of
    `standin` for `bot_id`), and its Dify app (CHAT, CHATFLOW or FORM)."""

    name: str
    simulator: WeComSimulator
    app: str  # CHAT, CHATFLOW, FORM (Dify apps) or OPENAI
    standin: WeComWebSocketStandIn | None = None
    bot_id: str = ""
    command: str = ""  # a route of the bot takes its messages: they begin with the route's command
    app_key: str = ""  # the app its messages must reach: its Dify API key (the model's name for the model's)

    @property
    def mode(self) -> str:
        return "long_connection" if self.standin is not None else "callback"


@dataclass
class Workload:
    bots: list[Bot]
    replicas: list  # GunicornReplica, some of them down at times
    dify: DifyStandIn
    history: History
    rng: random.Random
    window_seconds: float  # how long WeCom polls a bubble
    openai: OpenAIStandIn | None = None  # the OpenAI-compatible server the OPENAI bots' answers come from
    dify_fault_share: float = 0.15
    retry_share: float = 0.15
    long_share: float = 0.0  # of the callback bots' messages: answers longer than a bubble
    # Replicas the load balancer sends nothing to (stopped, or starting and not ready yet: the nemesis keeps this),
    # as a Kubernetes Service routes only to ready pods. A frozen replica stays in: its probe has not failed yet.
    unready: set[int] | None = None
    stalled_seconds: float = 20.0  # longer than the gateways' DIFY_READ_TIMEOUT
    calm: threading.Event | None = None  # set in the nemesis's control phases: no Dify fault is injected then

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._tags: set[str] = set()

    def new_tag(self) -> str:
        """A tag no other message of the run has: the checker and the stand-ins tell messages apart by it (drawn at
        random, two of 500 messages shared one now and then: a Sentinel run of 2026-11-28 counted the calls and rows
        of one as another's)."""
        with self._lock:
            while (tag := secrets.token_hex(3)) in self._tags:
                pass
            self._tags.add(tag)
            return tag

    def pick(self, items):
        with self._lock:
            return self.rng.choice(items)

    def chance(self, share: float) -> bool:
        with self._lock:
            return self.rng.random() < share

    def routable(self) -> list[int]:
        """The replicas a callback may go to now (all of them if none is ready, as a balancer with no ready pod
        still tries)."""
        ready = [n for n in range(len(self.replicas)) if n not in (self.unready or ())]
        return ready or list(range(len(self.replicas)))

    def uniform(self, low: float, high: float) -> float:
        with self._lock:
            return self.rng.uniform(low, high)

    # --- one message ------------------------------------------------------------------------------------------

    def converse(self, userid: str) -> None:
        """One message of `userid`, from sending it to the end of its bubble."""
        bot = self.pick(self.bots)
        tag = self.new_tag()
        long = bot.standin is None and bot.app != FORM and self.chance(self.long_share)
        sentences = int(self.uniform(*LONG_SENTENCES)) if long else int(self.uniform(8, 24))
        fault = self.pick(DIFY_FAULTS) if self.chance(self.dify_fault_share) else ""
        if self.calm is not None and self.calm.is_set():
            fault = ""  # (the dice are thrown anyway: the seeded schedule stays the same)
        scripts = self._scripts(bot, tag, sentences, fault, long)
        server = self.openai if bot.app == OPENAI else self.dify
        for steps, times in scripts:
            server.script(steps, match=tag, times=times)
        # A cut or stalled script ends its run there too (a cut only drops the first reader's connection: the run
        # plays its steps on, and there are none left): a reader that follows the run again gets that as the run's
        # whole answer (with no note), which is right.
        played = {n for t, n in sentences_in(repr(scripts[-1][0])) if t == tag}
        payload = bot.simulator.text_message(f"{bot.command} question {tag}".strip(), userid=userid)
        msgid = payload["msgid"]
        self.history.add(
            "message",
            msgid=msgid,
            tag=tag,
            sentences=sentences,
            bot=bot.name,
            route=bot.command.lstrip("/"),
            app=bot.app,
            app_key=bot.app_key,
            mode=bot.mode,
            dify_fault=fault,
            dify_refusals=(_OPENAI_REFUSALS if bot.app == OPENAI else _REFUSALS).get(fault, 0),
            run_sentences=len(played) if fault in ("cut", "stalled") else sentences,
            long=long,
            userid=userid,
            response_url=payload["response_url"],
        )
        if bot.standin is not None:
            self._converse_on_the_websocket(bot, msgid, tag, userid)
        else:
            reply = self._deliver(bot, payload)
            if reply is not None and self.chance(self.retry_share):
                time.sleep(self.uniform(0.0, 2.0))
                reply = self._deliver(bot, payload, repeat=True) or reply
            if reply is not None:
                self._follow(bot, msgid, reply, userid)
        self.history.add("ended", msgid=msgid)

    def _scripts(self, bot: Bot, tag: str, sentences: int, fault: str, long: bool) -> list[tuple[list, int | None]]:
        """What the backend plays for the message's requests: (steps, for how many requests; None: every one), in
        order."""
        if bot.app == OPENAI:
            return self._openai_scripts(tag, sentences, fault, long)
        if fault == "refused_429":
            refusal = d.http_error(429, "too_many_requests", "Too many requests")
            return [([refusal], 1), (self._steps(bot, tag, sentences, "", long), None)]
        if fault == "unavailable_503":
            return [([d.http_error(503, "service_unavailable", "Service Unavailable")], None)]
        return [(self._steps(bot, tag, sentences, fault, long), None)]

    def _steps(self, bot: Bot, tag: str, sentences: int, fault: str, long: bool = False) -> list[tuple]:
        text = answer_text(tag, sentences, LONG_PADDING if long else "")
        seconds = self.uniform(3, 15)
        if bot.app == FORM:
            steps = self._form_steps(tag, sentences, seconds)
        elif bot.app == CHATFLOW:
            steps = apps.chatflow_answer(text, pieces=sentences, delay=seconds / sentences)
        else:
            steps = d.answer(text, pieces=sentences, delay=seconds / sentences)
        if fault == "slow":
            return [d.first_byte_delay(self.uniform(2, 6)), *steps]
        if fault == "cut":
            return [*steps[: len(steps) // 2], d.cut()]
        if fault == "http_500":
            return [d.http_error(500, "internal_server_error", "Internal Server Error")]
        if fault == "stalled":
            return [*steps[: len(steps) // 3], d.stall(self.stalled_seconds)]
        return steps

    def _openai_scripts(self, tag: str, sentences: int, fault: str, long: bool) -> list[tuple[list, int | None]]:
        """The same answers and faults as Dify's, as an OpenAI-compatible server streams them (a chunk a sentence)."""
        if fault == "refused_429":
            return [
                ([o.http_error(429, "Rate limit reached", "rate_limit_error")], 1),
                (self._openai_steps(tag, sentences, "", long), None),
            ]
        if fault == "unavailable_503":
            return [([o.http_error(503, "The server is overloaded", "server_error")], None)]
        return [(self._openai_steps(tag, sentences, fault, long), None)]

    def _openai_steps(self, tag: str, sentences: int, fault: str, long: bool) -> list[tuple]:
        delay = self.uniform(3, 15) / sentences
        pieces = [sentence(tag, n) + (LONG_PADDING if long else "") for n in range(sentences)]
        steps = [step for piece in pieces for step in (o.text(piece), o.sleep(delay))]
        ending = [o.finish("stop"), o.usage(completion=sentences)]
        if fault == "slow":
            return [o.sleep(self.uniform(2, 6)), *steps, *ending]
        if fault == "cut":
            return [*steps[: len(steps) // 2], o.cut()]
        if fault == "http_500":
            return [o.http_error(500, "The server had an error", "server_error")]
        if fault == "stalled":
            return [*steps[: len(steps) // 3], o.sleep(self.stalled_seconds)]
        return [*steps, *ending]

    def _form_steps(self, tag: str, sentences: int, seconds: float) -> list[tuple]:
        """A chatflow run that streams half its sentences, pauses for an approval, then answers the rest (which,
        after streamed text, Dify 1.14.2 never streams: only the run's outputs hold it)."""
        half, delay = sentences // 2, seconds / sentences
        before = [step for n in range(half) for step in (d.message(sentence(tag, n)), d.sleep(delay))]
        after = [step for n in range(half, sentences) for step in (d.message(sentence(tag, n)), d.sleep(delay))]
        form = apps.form(f"Approve {tag}?", actions=(("approve", "Approve", "primary"),), branches={"*": after})
        return [apps.workflow_started(), *before, form]

    def _tap(self, bot: Bot, msgid: str, card: dict, userid: str) -> None:
        """The user taps the card a moment after it shows, on any replica; with no answer (WeCom drops a click that
        gets none within 5 s), again a little later, six times at most (over 10-20 s: a user whose tap did nothing
        tries again). The tap's response_url is where a rest may come."""
        time.sleep(self.uniform(0.5, 4.0))
        for attempt in range(6):
            click = bot.simulator.card_click(card, "approve", userid)
            replica = self.pick(self.routable())
            ok, reply, error = self._send(bot, click, replica)
            desc = ((reply or {}).get("template_card") or {}).get("main_title", {}).get("desc", "")
            self.history.add(
                "click", msgid=msgid, replica=replica, attempt=attempt, ok=ok and reply is not None, error=error,
                desc=desc, response_url=click["response_url"],
            )  # fmt: skip
            if ok and reply is not None:
                return
            time.sleep(self.uniform(1.0, 3.0))

    def _deliver(self, bot: Bot, payload: dict, repeat: bool = False) -> dict | None:
        """Deliver the message to a replica, retrying on the others like WeCom behind a load balancer (three tries
        in all, each on another replica); the reply."""
        order = self.routable()
        with self._lock:
            self.rng.shuffle(order)
        for attempt in range(3):
            replica = order[attempt % len(order)]
            ok, reply, error = self._send(bot, payload, replica)
            self.history.add(
                "delivery",
                msgid=payload["msgid"],
                replica=replica,
                repeat=repeat,
                attempt=attempt,
                ok=ok,
                error=error,
                **_frame(reply),
            )
            if ok and reply is not None:
                return reply
            time.sleep(1.0)
        return None

    def _follow(self, bot: Bot, msgid: str, first: dict, userid: str) -> None:
        stream_id = first["stream"]["id"]
        finished = first["stream"].get("finish", False)
        deadline = time.monotonic() + self.window_seconds
        tapping: threading.Thread | None = None
        while not finished and time.monotonic() < deadline:
            time.sleep(1.0)
            replica = self.pick(self.routable())
            ok, reply, error = self._send(bot, bot.simulator.poll_message(stream_id, userid), replica)
            self.history.add("poll", msgid=msgid, replica=replica, ok=ok, error=error, **_frame(reply))
            if ok and reply is not None and reply.get("stream"):
                finished = bool(reply["stream"].get("finish"))
            if ok and reply is not None and "template_card" in reply and tapping is None:
                tapping = threading.Thread(target=self._tap, args=(bot, msgid, reply["template_card"], userid))
                tapping.start()
        if tapping is not None:
            tapping.join(30)

    def _converse_on_the_websocket(self, bot: Bot, msgid: str, tag: str, userid: str) -> None:
        """Push the message down the bot's WebSocket (once a replica holds it), then wait for its stream's last
        frame, or for the rest of the answer as a proactive message (its req_id died with its connection)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                req_id = bot.standin.deliver_text(bot.bot_id, f"question {tag}", userid=userid, msgid=msgid)
                break
            except Exception as exc:  # noqa: BLE001 - no replica holds the bot right now: WeCom waits
                self.history.add("delivery", msgid=msgid, ok=False, error=str(exc)[:120], stream="", content="")
                if time.monotonic() > deadline:
                    return
                time.sleep(1.0)
        delivered = self.history.add("delivery", msgid=msgid, ok=True, req_id=req_id, stream="", content="")["t"]
        req_ids = [req_id]
        if self.chance(self.retry_share):  # WeCom may send a callback again ("可能因为网络等原因重复回调")
            time.sleep(self.uniform(0.0, 2.0))
            try:
                again = bot.standin.deliver_text(bot.bot_id, f"question {tag}", userid=userid, msgid=msgid)
                self.history.add("delivery", msgid=msgid, ok=True, req_id=again, repeat=True, stream="", content="")
                req_ids.append(again)
            except Exception as exc:  # noqa: BLE001 - no replica holds the bot right now: the first stands
                self.history.add("delivery", msgid=msgid, ok=False, repeat=True, error=str(exc)[:120], stream="")
        deadline = time.monotonic() + self.window_seconds
        while time.monotonic() < deadline:
            if any(frame.get("stream", {}).get("finish") for r in req_ids for frame in bot.standin.frames(r)):
                return
            to_the_user = (b for b in list(bot.standin.proactive) if b.get("chatid") == userid)
            if any(body["_received_at"] >= delivered for body in to_the_user):
                time.sleep(2.0)  # anything that follows it
                return
            time.sleep(0.5)

    @staticmethod
    def _send(bot: Bot, payload: dict, replica: int) -> tuple[bool, dict | None, str]:
        try:
            return True, bot.simulator.send(payload, replica=replica), ""
        except Exception as exc:  # noqa: BLE001 - a refused connection, a timeout, a 5xx: WeCom tries again
            return False, None, f"{type(exc).__name__}: {str(exc)[:120]}"


def _frame(reply: dict | None) -> dict:
    """What a reply showed: its bubble's text, and a card that came with it (its task id, title and summary)."""
    stream = (reply or {}).get("stream") or {}
    shown = {"stream": stream.get("id", ""), "content": stream.get("content", ""), "finish": bool(stream.get("finish"))}
    if card := (reply or {}).get("template_card"):
        title = (card.get("main_title") or {}).get("title", "")
        shown |= {"card": card.get("task_id", "?"), "card_text": f"{title} {card.get('sub_title_text', '')}"}
    return shown


class Users:
    """`count` users, each conversing in a loop until `stop` is set, with a short pause between messages."""

    def __init__(self, workload: Workload, count: int):
        self.workload = workload
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(f"user{n}",), name=f"user{n}", daemon=True) for n in range(count)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _run(self, userid: str) -> None:
        while not self.stop.is_set():
            self.workload.converse(userid)
            self.stop.wait(self.workload.uniform(0.2, 2.0))

    def finish(self, timeout: float) -> None:
        """Send nothing new, and wait for the messages in flight to end."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout)


class Arrivals:
    """Open-loop load: messages arrive at random (a Poisson process of `per_second`), each from one of `count`
    users picked at random, whether or not earlier answers have finished (at most `cap` open at once, as a bound on
    this harness's threads)."""

    def __init__(self, workload: Workload, count: int, per_second: float, cap: int = 60):
        self.workload = workload
        self.users = [f"user{n}" for n in range(count)]
        self.per_second = per_second
        self.open = threading.BoundedSemaphore(cap)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="arrivals", daemon=True)
        self.conversations: list[threading.Thread] = []

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        rng = random.Random(self.workload.rng.getrandbits(64))
        while not self.stop.wait(rng.expovariate(self.per_second)):
            if not self.open.acquire(blocking=False):
                continue  # the harness's bound, not the gateway's: this arrival is skipped
            conversation = threading.Thread(target=self._converse, args=(rng.choice(self.users),), daemon=True)
            self.conversations.append(conversation)
            conversation.start()

    def _converse(self, userid: str) -> None:
        try:
            self.workload.converse(userid)
        finally:
            self.open.release()

    def finish(self, timeout: float) -> None:
        """Send nothing new, and wait for the messages in flight to end."""
        self.stop.set()
        self.thread.join(timeout)
        for conversation in self.conversations:
            conversation.join(timeout)
