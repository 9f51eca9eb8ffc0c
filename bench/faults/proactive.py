"""The campaign's proactive messages: pushes through the push API and a schedule's ticks, both to group robots of
the WeCom API stand-in, whose link the nemesis cuts, slows and loses replies of (FAULTS.md, "Pushes and ticks").

- The workload's side (`Pusher`): a client of the push API sending a numbered markdown push every few seconds to
  the `chat` bot's robot `pushes`, to any ready replica, asking again with the same Idempotency-Key (on another
  replica) until it has the push's status, reading a push still `sending` until it is not, and sending again, with
  its key, a push that failed having sent nothing (`sent_nothing`), as the API's docs tell a client to.
- The collector's side (`collect`): what each robot took, and, once no tick is open any more or a minute passed,
  which ticks were due in the run and which are still open.
- The checker's side (`check`): each push and each due tick shown at its robot at most once, shown when said `sent`
  or `pushed`, not shown when said `failed` or `skipped`, never left without an answer (a push) or open (a tick),
  and each with one audit row that says what became of it.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime

import httpx

from bench.faults.history import History
from bench.faults.nemesis import HOLDER_FAULTS, NODE_FAULTS, REPLICA_FAULTS

PUSH_ROBOT, TICK_ROBOT = "faults-pushes", "faults-ticks"  # the robots' webhook keys at the stand-in
PUSH_API_TOKEN = "faults-push-api-token-0123456789"
SCHEDULE = "minutely"
PUSH_PATIENCE_SECONDS = 90.0  # how long the client asks again for one push (past the 40 s a `sending` may last)
# Two tries of one tick asked closer than this ran at once: a try is taken over only once its lease lapsed, and asked
# again 20 s after it failed.
TRIES_APART_SECONDS = 1.0
PUSH_EVERY = (3.0, 6.0)  # seconds between pushes: about 13 a minute, below a robot's 20
OPEN_TICKS_WAIT_SECONDS = 60.0
_PUSH = re.compile(r"push〔(\d+)〕")
_TICK = re.compile(r"tick-time (\d{4}-\d\d-\d\d \d\d:\d\d) asked")
STOPPED_MID_SEND = "the process sending it stopped"  # (services/push/direct.py: no audit row can say so)
# What can stop a push's sender mid-send: a replica's process killed, ended, frozen or stalled, or its node lost.
STOPPING = frozenset(REPLICA_FAULTS + HOLDER_FAULTS + NODE_FAULTS)


def bot_entries(api_base: str) -> str:
    """The `chat` bot's robots and its every-minute schedule (in UTC, so that the checker reads a tick's time back
    from its question, which the Dify stand-in's answer repeats)."""
    hook = f"{api_base}/cgi-bin/webhook/send?key="
    return (
        f'[bots.chat.webhooks]\npushes = "{hook}{PUSH_ROBOT}"\nticks = "{hook}{TICK_ROBOT}"\n\n'
        f'[[bots.chat.schedules]]\nname = "{SCHEDULE}"\ncron = "* * * * *"\ntimezone = "UTC"\n'
        f'question = "tick-time {{datetime}} asked"\nto = ["webhook:ticks"]\n\n'
    )


class Pusher:
    """The push API's client (one push at a time, each given up after PUSH_PATIENCE_SECONDS)."""

    def __init__(self, replicas: list, history: History, rng: random.Random, unready: set[int]):
        self.replicas, self.history, self.rng, self.unready = replicas, history, rng, unready
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pusher", daemon=True)
        self.http = httpx.Client(timeout=20.0, headers={"Authorization": f"Bearer {PUSH_API_TOKEN}"})

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(PUSH_PATIENCE_SECONDS + 30)
        self.http.close()

    def _run(self) -> None:
        number = 0
        while not self.stop.wait(self.rng.uniform(*PUSH_EVERY)):
            number += 1
            self._push(number)

    def _push(self, number: int) -> None:
        event = self.history.add("push", n=number, replies=[], final="", id="", error="")
        body = {"bot": "chat", "webhook": "pushes", "markdown": f"push〔{number}〕 from the fault campaign"}
        key = f"faults-push-{number}"
        deadline, send_again = time.monotonic() + PUSH_PATIENCE_SECONDS, False
        while time.monotonic() < deadline:
            replica = self._replica()
            try:
                if event["id"] and not send_again:  # its id is known: its status, from any replica
                    reply = self.http.get(f"{replica.url}/api/push/{event['id']}")
                else:
                    reply = self.http.post(f"{replica.url}/api/push", json=body, headers={"Idempotency-Key": key})
            except httpx.HTTPError as exc:
                event["replies"].append(type(exc).__name__)
                time.sleep(1.0)
                continue
            found = _json(reply)
            event["replies"].append(f"{reply.status_code} {found.get('status', found.get('error', ''))}".strip())
            if reply.status_code == 200:
                event["id"] = found.get("id", event["id"])
                if found.get("status") != "sending":
                    event.update(final=found.get("status", ""), error=found.get("error", ""), end=time.time())
                    send_again = bool(found.get("sent_nothing"))
                    if not send_again:
                        return
            wait = float(reply.headers.get("Retry-After", "1")) if reply.status_code == 429 else 1.0
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
        event.setdefault("end", time.time())

    def _replica(self):
        ready = [replica for index, replica in enumerate(self.replicas) if index not in self.unready]
        return self.rng.choice(ready or self.replicas)


def collect(history: History, standin, client, open_key: str, started: float) -> None:
    """What the robots took (`robot_message`), the ticks due from the replicas' start on (`tick_due`: the run's
    every whole minute from `started` until now), and those still open once none is or a minute passed
    (`tick_open`). `client` reads the topology's data; `open_key` is the bot's open ticks."""
    deadline = time.monotonic() + OPEN_TICKS_WAIT_SECONDS
    still: list[str] = []
    while time.monotonic() < deadline:
        try:
            still = list(client.zrange(open_key, 0, -1))
        except Exception:  # noqa: BLE001 - Redis settling after the last fault: asked again
            still = ["?"]
        if not still:
            break
        time.sleep(1.0)
    ended = time.time()
    for member in still:
        history.add("tick_open", member=member.decode() if isinstance(member, bytes) else member)
    for tick in range((int(started) // 60 + 1) * 60, int(ended) - 5, 60):
        history.add("tick_due", tick=tick)
    for sent in list(standin.sent):
        content = (sent.body.get("markdown") or {}).get("content", "")
        history.add("robot_message", robot=sent.key, content=content, t=sent.at)


def audit_wanted(history: History) -> set[tuple[str, str]]:
    """The audit rows the ticks due owe: (bot, msgid)."""
    return {("chat", f"schedule:{SCHEDULE}:{event['tick']}") for event in history.of("tick_due")}


def check(events: list[dict]) -> dict:
    """The pushes' and ticks' counts (the checker's names), their problems, and what became of them."""
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for event in events:
        by_kind[event["kind"]].append(event)
    shown = {PUSH_ROBOT: Counter(), TICK_ROBOT: Counter()}
    for message in by_kind["robot_message"]:
        found = (_PUSH if message["robot"] == PUSH_ROBOT else _TICK).search(message["content"])
        if found and message["robot"] in shown:
            shown[message["robot"]][found.group(1)] += 1
    rows: dict[str, list[dict]] = defaultdict(list)
    for row in by_kind["audit_row"]:
        if row.get("row") in ("push", "schedule"):
            rows[row["msgid"]].append(row)
    audited = bool(by_kind["audit_row"])
    problems: list[dict] = []
    stops = [fault for fault in by_kind["fault"] if fault["fault"] in STOPPING]
    pushes = [_judge_push(push, shown[PUSH_ROBOT][str(push["n"])], rows, audited, stops) for push in by_kind["push"]]
    open_ticks = {event["member"].rpartition(":")[2] for event in by_kind["tick_open"]}
    at_once = _tries_at_once(by_kind["worked"])
    ticks = [
        _judge_tick(event["tick"], shown[TICK_ROBOT], rows, audited, str(event["tick"]) in open_ticks)
        for event in by_kind["tick_due"]
    ]
    for tick, _, found in ticks:
        if at_once[tick]:
            found["extra_dify_calls"] = f"{at_once[tick]} tries began while another had just begun"
    for what, verdicts in (("push", pushes), ("tick", ticks)):
        problems += [{"msgid": f"{what}:{ident}", "bot": "chat", **found} for ident, _, found in verdicts if found]
    counts = Counter(name for _, _, found in pushes + ticks for name in found)
    return {
        "counts": dict(counts),
        "problems": problems,
        "pushes": dict(Counter(outcome for _, outcome, _ in pushes)),
        "ticks": dict(Counter(outcome for _, outcome, _ in ticks)),
    }


def _tries_at_once(worked: list[dict]) -> Counter:
    """For each tick, its tries that began less than TRIES_APART_SECONDS after another of its tries (by the first
    log line naming each try's msgid, `schedule:<name>:<tick>#<try>`, on any replica): tries that ran at once."""
    prefix, began = f"schedule:{SCHEDULE}:", defaultdict(dict)
    for event in worked:
        msgid = event["msgid"]
        if msgid.startswith(prefix) and "#" in msgid:
            tries = began[int(msgid[len(prefix) :].partition("#")[0])]
            tries[msgid] = min(event["first"], tries.get(msgid, event["first"]))
    found: Counter = Counter()
    for tick, tries in began.items():
        times = sorted(tries.values())
        found[tick] = sum(after - before < TRIES_APART_SECONDS for before, after in zip(times, times[1:], strict=False))
    return found


def _judge_push(
    push: dict, shown: int, rows: dict[str, list[dict]], audited: bool, stops: list[dict]
) -> tuple[int, str, dict]:
    """A push's counts. One said stopped mid-send is excused its audit row only where a fault that can stop its
    sender (`stops`) ran while it was asked for: a push that went out while its sender lived owes its row."""
    found: dict[str, str] = {}
    final = push.get("final") or "no answer"
    if shown > 1:
        found["duplicate_deliveries"] = f"the robot took it {shown} times"
    if final == "sent" and not shown:
        found["lost"] = "said sent, never taken by the robot"
    if final == "failed" and shown:
        found["unexpected"] = "said failed, yet the robot took it"
    if final == "no answer":
        found["stuck"] = f"no status in {PUSH_PATIENCE_SECONDS:.0f} s: {push['replies'][-5:]}"
    own = rows.get(f"push:{push['id']}", []) if push.get("id") else []
    asked = (push["t"], push.get("end", push["t"]))
    stopped = STOPPED_MID_SEND in push.get("error", "") and any(_during(fault, *asked) for fault in stops)
    if audited and final != "no answer" and not stopped and [row["outcome"] for row in own] != [final]:
        found["audit_rows"] = f"said {final}; its rows say {[row['outcome'] for row in own]}"
    return push["n"], final, found


def _judge_tick(
    tick: int, shown: Counter, rows: dict[str, list[dict]], audited: bool, still_open: bool
) -> tuple[int, str, dict]:
    found: dict[str, str] = {}
    times = shown[datetime.fromtimestamp(tick, UTC).strftime("%Y-%m-%d %H:%M")]
    own = [row["outcome"] for row in rows.get(f"schedule:{SCHEDULE}:{tick}", [])]
    outcome = own[0] if own else ("open" if still_open else "nothing")
    if times > 1:
        found["duplicate_deliveries"] = f"the robot took the tick {times} times"
    if still_open:
        found["stuck"] = "still open at the end of the run"
    elif times == 0 and outcome in ("pushed", "nothing"):
        found["lost"] = f"never pushed, and {'its row says pushed' if own else 'nothing said why'}"
    if times and outcome in ("failed", "skipped"):
        found["unexpected"] = f"its row says {outcome}, yet the robot took it"
    if audited and (len(own) > 1 or (times and not own)):
        found["audit_rows"] = f"{len(own)} rows for the tick ({own}), taken {times} times"
    return tick, outcome, found


def _during(fault: dict, start: float, end: float) -> bool:
    return fault.get("start", fault["t"]) <= end and fault.get("end", fault["t"]) >= start


def _json(reply: httpx.Response) -> dict:
    try:
        found = reply.json()
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
