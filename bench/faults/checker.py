"""Reads a campaign's history and counts what went wrong, per message, in the model of Jepsen's queue checker but
stricter where the gateway promises more (FAULTS.md has the definitions):

- lost: the user got neither the whole answer (the bubble, plus whatever came through response_url) nor a clear
  note that it failed; a note that promises more ("the rest follows", "the full answer was sent") is no ending
  unless what it promised came;
- extra_dify_calls: Dify calls for one message beyond the first, except the one documented restart of an answer
  whose bubble had shown nothing yet, and only when a fault that can cost a stream its replica was under way
  (the restarts excused are reported: `excused_dify_calls`); never excused where the calls carry two trace ids (a
  trace is named by its stream: a restart keeps it, a WeCom retry taken as a message of its own does not);
- duplicate_deliveries: some of the answer shown twice, in one bubble or across the bubble and response_url; the
  same message posted twice (a note too); a second post to a response_url (WeCom refuses it, so it is only seen
  here: it means the gateway tried to deliver twice); a form's card in two replies (WeCom takes one per message);
- unexpected: text of another message, or its card; a Dify call for it made as another user;
- stuck: the bubble still unfinished when WeCom stopped polling it (a message none of whose deliveries WeCom took
  has no bubble: its answer reached the user whole through response_url, or it is lost);
- extra_form_submissions: a form Dify took more than once (clicks on any replica, replicas killed meanwhile);
- withdrawn: a bubble that showed some of the answer and later showed less (every frame is judged, not only the
  last);
- spurious_notes: a failure note on a message whose Dify call was healthy and that no fault touched;
- control_failures: a message of the control group (sent in one of the nemesis's calm phases, when no fault of any
  kind ran, and touched by none) that was not answered whole, or ended with a note;
- unexplained_notes: a failure note on a message no fault on its own path explains: not its Dify call made to fail,
  no fault of a replica that worked on it (the replicas' logs name them), no fault of Redis, MariaDB, the auth API or
  Dify's link while it was open, no fault of its WeCom mode's own way (the long connection, response_url);
- unexplained_dify_calls: a second Dify call the rule above excused, though no fault that can cost a stream its
  replica was on the message's own path (a replica that worked on it, or Redis);
- audit_rows: a message without exactly one row of its own in the audit table, or whose rows (its own, and those of
  the taps and rests that carried its text) do not say what its user was shown: the same sentences, and where the
  answer did not reach them whole the same failure notes (checked when the history holds the table's rows).

One window is counted apart, as `lost_in_intake` beside the counts (FAULTS.md, "Windows that remain"): a
long-connection message of which nothing was made anywhere (no stream, frame, message, audit row, nor a line of any
replica's log), whose every delivery met its holder's SIGKILL within INTAKE_WINDOW. WeCom takes no acknowledgement
of such a message but its reply and does not send it again, so a holder killed before its intake kept the message
takes it along. A message lost any other way, or so lost with its holder killed later, is `lost`.

Pushes and a schedule's ticks are messages of the checker too (bench/faults/proactive.py): shown at their robot twice
is `duplicate_deliveries`; said sent (pushed) and never shown, or a tick due that was neither pushed nor said why, is
`lost`; said failed (skipped) yet shown is `unexpected`; a push left without a status, or a tick still open at the
end, is `stuck`; a row that does not say what became of it is `audit_rows` (a push said stopped mid-send is excused
its row only where a fault that can stop its sender ran meanwhile); two tries of a tick begun within a second
of each other (by the replicas' logs) ran at once, each an `extra_dify_calls`.

Liveness is reported beside the counts: per fault kind (`by_fault`) and per app type (`by_app`), how many messages
were answered whole and how many ended with a failure note (per app also of those whose Dify call was not made to
fail, `asked_whole`, and of those the ones no fault of Dify's link touched, `under_our_faults`); and the control
group's (`control`).

Messages whose Dify call was made to fail (`dify_fault`) must end with the answer or a clear note. Every count is
also broken down by the faults that were active while the message was open.

A recorded history is checked again with `python -m bench.faults.checker HISTORY.jsonl[.gz]...` (FAULTS.md).
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bench.faults.answers import repeats, sentences_in
from bench.faults.history import read
from bench.faults.nemesis import (
    COSTS_LEASES,
    DIFY_FAULTS,
    HOLDER_FAULTS,
    REPLICA_FAULTS,
    REPLICA_LINK_FAULTS,
    WECOM_API_FAULTS,
    WECOM_FAULTS,
)
from bench.faults.proactive import check as check_proactive
from services.texts import CATALOGUE

COUNTS = (
    "lost",
    "extra_dify_calls",
    "duplicate_deliveries",
    "unexpected",
    "stuck",
    "extra_form_submissions",
    "withdrawn",
    "spurious_notes",
    "control_failures",
    "unexplained_notes",
    "unexplained_dify_calls",
    "audit_rows",
)
# Notes that tell the user the answer failed (or was cut short) and what to do: any of them is a clear ending. Not
# the texts of cards, headers and prompts, which end nothing (and, short, would match inside any answer).
_NOT_NOTES = {
    "placeholder", "continued", "full_answer", "help", "image_query", "file_query", "quote_context",
    "form_title", "form_choose", "form_choose_typed", "form_type_value", "form_value_noted", "form_then_choose",
    "form_submitted", "form_answered", "form_submit_button", "form_action_question", "form_needs_values",
    "form_not_yours", "form_expired_card", "form_rest", "file_link", "file_original", "file_named",
    "welcome_title", "suggestions_title", "citations_title", "progress_step",
    "form_choose_option", "form_option_unknown", "form_option_not_offered", "form_send_file", "form_send_files",
    "form_files_limit", "form_file_noted", "form_file_refused", "form_file_failed", "form_file_not_needed",
    "file_kind_image", "file_kind_document", "file_kind_audio", "file_kind_video", "file_kind_any",
}  # fmt: skip
# Notes that promise the user more, or tell them they have it all: an ending only when that is true (the answer
# reached them whole).
PROMISES = frozenset(
    {
        "window_continues",
        "overflow_continues",
        "sent_separately",
        "rest_sent_separately",
        "form_waiting",
        "nothing_more",
    }
)
# The gateway's admission control (a user with too many answers open, or sending too fast): a right refusal, never
# spurious.
ADMISSION = frozenset({"too_many_in_flight", "rate_limited"})
HEADERS = [CATALOGUE["zh"][key] for key in ("continued", "full_answer", "placeholder")]
OUTAGE_NOTE = "store_unavailable"  # a delivery taken while Redis was away
CLEAR_NOTES = {
    key: text.split("{", 1)[0].strip()
    for key, text in CATALOGUE["zh"].items()
    if key not in _NOT_NOTES and text.split("{", 1)[0].strip()
}
# How far past its end a fault that can cost a stream its replica (nemesis.COSTS_LEASES) still excuses the restart
# of an answer that had shown nothing: a lease, the takeover grace, a failover settling.
RESTART_REACH_SECONDS = 30.0
# Where a fault strikes: on the replica its target names, on a long connection's or a callback's own way; any other
# (Redis, MariaDB, the auth API, Dify's link) on every message's path. Which Redis node holds a message's keys is not
# told apart: a fault of any node counts as on every message's path.
REPLICA_KINDS = frozenset(REPLICA_FAULTS + HOLDER_FAULTS + REPLICA_LINK_FAULTS)
CONNECTION_KINDS = frozenset(WECOM_FAULTS)
CALLBACK_KINDS = frozenset({"response_url_busy"})
_REPLICA = re.compile(r"replica (\d+)")
# A fault this close before a message began still counts as touching it (the topology settling after a heal).
SETTLE_SECONDS = 5.0
# A long-connection message is kept (its stream opened in Redis, or its body in the database's spool) within its
# intake's first quarter second (services/longconn/spool.py, KEEP_AFTER_SECONDS): the window in which its holder's
# death takes it along, measured from its delivery, with a tenth of a second either side for the frame's reading
# (a kill just before the stand-in's send returned) and the database's write.
INTAKE_WINDOW = (-0.1, 0.35)
KILLS = frozenset({"holder_kill", "replica_kill", "node_loss"})  # the faults that SIGKILL a replica
HOLDER = "(the holder)"  # in a kill's target: the replica held the long connection then (nemesis.py)


@dataclass
class Verdict:
    msgid: str
    faults: list[str]
    tag: str = ""
    bot: str = ""
    problems: dict[str, str] = field(default_factory=dict)  # count name -> what was seen
    notes: list[str] = field(default_factory=list)
    extra_calls: int = 0
    excused_calls: int = 0
    app: str = ""
    route: str = ""  # the bot's route its message took ("": the bot's own backend)
    started: float = 0.0
    whole: bool = False  # every sentence of the answer reached the user
    noted: bool = False  # it ended with a failure note
    injected: bool = False  # its Dify call was made to fail (the workload's own fault)
    first_text_s: float | None = None
    last_text_s: float | None = None
    causes: list[str] = field(default_factory=list)  # what on its path can explain a note ("injected": its Dify call)
    unexplained_calls: int = 0
    shown: set[int] = field(default_factory=set)  # the answer's sentences its user has
    endings: set[str] = field(default_factory=set)  # the notes (not promises) its user was shown
    cards: int = 0  # the replies that carried a card (a paused run's form)


def check(events: list[dict], forgive: bool = False) -> dict:
    """The counts of one campaign run (one topology), with every non-zero one explained. With `forgive` (the
    forgive_all mutant), a checker that explains everything away: every problem of a message a fault touched is
    excused, and no note counts as spurious; only the control group is judged as ever."""
    by_msgid: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for event in events:
        if "msgid" in event:
            by_msgid[event["msgid"]][event["kind"]].append(event)
    tags = Counter(kinds["message"][0]["tag"] for kinds in by_msgid.values() if kinds.get("message"))
    if shared := sorted(tag for tag, count in tags.items() if count > 1):
        raise ValueError(f"messages share the tags {shared}: their calls and rows cannot be told apart")
    calls_by_tag: dict[str, list[dict]] = defaultdict(list)
    taken_by_tag: dict[str, int] = defaultdict(int)
    for event in events:
        if event["kind"] == "dify_call":
            calls_by_tag[event["tag"]].append(event)
        elif event["kind"] == "form_submission" and event["status"] == 200:
            taken_by_tag[event["tag"]] += 1
    faults = [event for event in events if event["kind"] == "fault"]
    calms = [(event["start"], event["end"]) for event in events if event["kind"] == "calm"]
    verdicts = [
        judge(kinds["message"][0], kinds, calls_by_tag[kinds["message"][0]["tag"]], faults)
        for kinds in by_msgid.values()
        if kinds.get("message")
    ]
    reattaches = [event["snapshot"] for event in events if event["kind"] == "dify_reattach"]
    audit_rows = [event for event in events if event["kind"] == "audit_row"]
    if audit_rows:
        for verdict in verdicts:
            judge_audit(verdict, by_msgid[verdict.msgid], audit_rows)
    for verdict in verdicts:
        if why := lost_in_intake(by_msgid[verdict.msgid], faults):
            verdict.problems = {"lost_in_intake": why}  # (its `lost`, `stuck` and `audit_rows` are that window)
        if (taken := taken_by_tag[verdict.tag]) > 1:
            verdict.problems["extra_form_submissions"] = f"Dify took the form {taken} times"
    if forgive:
        for verdict in verdicts:
            if verdict.faults != ["none"]:
                verdict.problems.clear()
                verdict.extra_calls = verdict.unexplained_calls = 0
            verdict.problems.pop("spurious_notes", None)
            verdict.problems.pop("unexplained_notes", None)
    for verdict in verdicts:
        if in_control(verdict, calms) and (not verdict.whole or verdict.noted):
            seen = "a failure note" if verdict.noted else "not the whole answer"
            verdict.problems["control_failures"] = f"{seen} in a calm phase, no fault anywhere"
    result = summarize(verdicts, faults)
    proactive = check_proactive(events)  # the pushes and the schedule's ticks (bench/faults/proactive.py)
    for name, count in proactive.pop("counts").items():
        result[name] += count
    result["problems"] += proactive.pop("problems")
    result["proactive"] = proactive
    control = [verdict for verdict in verdicts if in_control(verdict, calms)]
    result["control"] = {"phases": len(calms), **liveness(control)}
    result["runs_followed_again"] = {"resumed": sum(reattaches), "after_a_form": len(reattaches) - sum(reattaches)}
    result["run_record_reads"] = sum(1 for event in events if event["kind"] == "dify_record_read")
    result["form_submissions"] = sum(taken_by_tag.values())
    result["conversations"] = conversations([event for event in events if event["kind"] == "dify_call"])
    return result


def conversations(calls: list[dict]) -> dict[str, int]:
    """How each user's messages after their first on an app went on (each message's first Dify call): continuing a
    conversation, or starting one again (a conversation the gateway lost, or one an earlier message's failed call
    never made: a liveness figure)."""
    continued = started_again = 0
    seen: set[tuple[str, str]] = set()
    asked: set[str] = set()
    for call in sorted(calls, key=lambda call: call["t"]):
        if "user" not in call or call["tag"] in asked:
            continue  # an old history; a message's call made again (a refusal waited out) is the same message
        asked.add(call["tag"])
        who = (call.get("app", ""), call["user"])
        if who in seen:
            continued += bool(call["conversation"])
            started_again += not call["conversation"]
        seen.add(who)
    return {"messages": len(asked), "continued": continued, "started_again": started_again}


def judge(message: dict, kinds: dict[str, list[dict]], asked: list[dict], faults: list[dict]) -> Verdict:
    """One message: what its user was shown, and what Dify was asked (`asked`: its Dify calls, as Dify got them)."""
    tag, expected = message["tag"], message["sentences"]
    frames = sorted(
        [e for e in kinds["delivery"] + kinds["poll"] if e.get("ok") and e.get("stream")], key=lambda e: e["t"]
    )
    # A message lives until its last word reached the user: a bubble closed early still has its rest to come.
    ended = max([e["t"] for e in frames + kinds["ended"] + kinds["response_url"]] + [message["t"]])
    verdict = Verdict(message["msgid"], active_faults(faults, message["t"], ended), tag, message.get("bot", ""))
    workers = {e["replica"] for e in kinds["worked"]} if kinds["worked"] else None  # None: not known (an old history)
    path = [f for f in faults if touches(f, message["t"], ended) and on_path(f, message, workers)]
    verdict.causes = (["injected"] if message.get("dify_fault") else []) + sorted({f["fault"] for f in path})
    verdict.app, verdict.started = message.get("app", verdict.bot), message["t"]
    verdict.route = message.get("route", "")
    verdict.injected = bool(message.get("dify_fault"))
    calls = sorted(e["t"] for e in asked)[message.get("dify_refusals", 0) :]  # refused by design: ran nothing
    if foreign := {e["user"] for e in asked if e.get("user") and not e["user"].endswith(f":{message['userid']}")}:
        verdict.problems["unexpected"] = f"Dify asked as another user: {sorted(foreign)}"
    if message.get("app_key") and (
        others := {e["app"] for e in asked if e.get("app", message["app_key"]) != message["app_key"]}
    ):
        verdict.problems["unexpected"] = f"another app asked: {sorted(others)}"  # (a route, or a bot, mixed up)
    posts = [e["content"] for e in kinds["response_url"] if e.get("accepted", True)]
    finals = [e for e in frames if e["finish"]]
    final = finals[-1]["content"] if finals else ""
    websocket = message.get("mode") == "long_connection"
    if websocket and not finals and frames:
        # a stream whose req_id died keeps showing its last frame; of a message WeCom sent again, each bubble does,
        # and the rest continues the one that showed the most (the latest, of those that showed as much)
        lasts = [shown[-1]["content"] for shown in bubbles_of(frames).values()]
        final = max(reversed(lasts), key=lambda content: len(answer_part(content)))
    judge_frames(verdict, frames)
    judge_cards(verdict, frames)
    judge_posts(verdict, kinds["response_url"], posts)
    judge_rests(verdict, frames, kinds["response_url"])
    # what the user has: the bubble's answer, then each message after it (a rest continues where the bubble stopped)
    delivered = sentences_in("".join(answer_part(text) for text in [final, *posts]))
    shown = [found for frame in frames for found in sentences_in(frame["content"])]
    if others := {t for t, _ in shown + delivered if t != tag}:
        verdict.problems["unexpected"] = f"text of other messages: {sorted(others)}"
    own = [n for t, n in delivered if t == tag]
    if twice := repeats(own):
        verdict.problems.setdefault(
            "duplicate_deliveries", f"sentences {twice[:5]} reached the user twice (bubble and response_url)"
        )
    # the whole answer, or (a cut or stalled run, followed again by another replica) the whole of what the run held
    complete = set(range(expected)) <= set(own) or set(range(message.get("run_sentences", expected))) <= set(own)
    verdict.notes = [key for key, note in CLEAR_NOTES.items() if any(note in text for text in [final, *posts])]
    endings = [note for note in verdict.notes if note not in PROMISES]
    if frames and not finals and not (websocket and posts):
        # (a long-connection stream whose req_id died with its connection ends with the rest sent proactively; no
        # delivery WeCom took, no bubble: its answer is whole through response_url, or lost)
        verdict.problems["stuck"] = "the bubble never finished while WeCom polled it"
    if not complete and not endings:
        promised = f", though the bubble promised it ({verdict.notes})" if verdict.notes else " and no note"
        verdict.problems["lost"] = f"{len(set(own))} of {expected} sentences{promised}; final bubble {final[:80]!r}"
    failures = [note for note in endings if note not in ADMISSION]
    verdict.whole, verdict.noted = complete, bool(failures)
    verdict.shown, verdict.endings = set(own), set(endings)
    if failures and not message.get("dify_fault") and verdict.faults == ["none"]:
        verdict.problems["spurious_notes"] = f"{failures} on a message no fault touched"
    if failures and not verdict.causes:
        verdict.problems["unexplained_notes"] = f"{failures}; faults not on its path: {verdict.faults}"
    allowed, verdict.excused_calls = allowed_calls(calls, frames, tag, faults)
    if len(traces := {e["trace"] for e in asked if e.get("trace")}) > 1:
        allowed, verdict.excused_calls = 1, 0  # taken as two messages (a trace is a stream's): no restart of one
    verdict.extra_calls = max(0, len(calls) - allowed)
    if verdict.extra_calls:
        verdict.problems["extra_dify_calls"] = f"{len(calls)} Dify calls" + (
            f", in {len(traces)} traces: its tries opened a stream each" if len(traces) > 1 else ""
        )
    if verdict.excused_calls and allowed_calls(calls, frames, tag, path)[1] == 0:
        verdict.unexplained_calls = verdict.excused_calls
        verdict.problems["unexplained_dify_calls"] = "a restart excused by a fault on no path of this message"
    with_text = [e["t"] for e in frames if any(t == tag for t, _ in sentences_in(e["content"]))]
    if with_text:
        verdict.first_text_s = with_text[0] - message["t"]
    if complete and finals:
        verdict.last_text_s = finals[-1]["t"] - message["t"]
    return verdict


def lost_in_intake(kinds: dict[str, list[dict]], faults: list[dict]) -> str:
    """What killed a long-connection message's holder in its intake, if that is all that became of the message (no
    trace of it anywhere, every delivery within INTAKE_WINDOW of a holder's kill), else ""."""
    message = kinds["message"][0]
    if message.get("mode") != "long_connection" or kinds["worked"] or kinds["response_url"] or kinds["audit_row"]:
        return ""
    if any(event.get("stream") for event in kinds["delivery"] + kinds["poll"]):
        return ""
    delivered = [event["t"] for event in kinds["delivery"] if event.get("ok")]
    kills = [fault for fault in faults if fault["fault"] in KILLS and HOLDER in fault.get("target", "")]
    before, after = INTAKE_WINDOW
    why = []
    for at in delivered:
        killed = [fault for fault in kills if at + before <= fault.get("start", fault["t"]) <= at + after]
        if not killed:
            return ""
        why.append(
            f"{killed[0]['fault']} of {killed[0]['target']} {killed[0].get('start', killed[0]['t']) - at:+.3f} s"
        )
    return "delivered, then its holder killed: " + "; ".join(why) if why else ""


def judge_frames(verdict: Verdict, frames: list[dict]) -> None:
    """Every reply a bubble got, in order: none shows a sentence twice, and none takes back a sentence an earlier
    one showed (a bubble's text only grows, until it ends)."""
    # per bubble (bubble_of): the sentences shown so far
    seen: dict[str, set[int]] = defaultdict(set)
    for frame in frames:
        own = [n for t, n in sentences_in(frame["content"]) if t == verdict.tag]
        if twice := repeats(own):
            verdict.problems.setdefault("duplicate_deliveries", f"one bubble reply showed sentences {twice} twice")
        earlier = seen[bubble_of(frame)]
        if gone := sorted(earlier - set(own)):
            verdict.problems.setdefault("withdrawn", f"sentences {gone[:5]} shown, then gone at t={frame['t']}")
        earlier.update(own)


def judge_rests(verdict: Verdict, frames: list[dict], sent: list[dict]) -> None:
    """A bubble that never finished (a long connection's req_id that died with its connection) stays on the user's
    screen as its last frame left it: a sentence of it in any message sent after that frame (the rest, the whole
    answer, a note) reaches the user twice, whatever else the message's other bubbles showed."""
    for shown in bubbles_of(frames).values():
        if any(frame["finish"] for frame in shown):
            continue
        last = shown[-1]
        on_screen = {n for t, n in sentences_in(last["content"]) if t == verdict.tag}
        for message in sent:
            if message.get("accepted", True) and message["t"] > last["t"]:
                again = sorted(on_screen & {n for t, n in sentences_in(message["content"]) if t == verdict.tag})
                if again:
                    verdict.problems.setdefault(
                        "duplicate_deliveries",
                        f"sentences {again[:5]} of an unfinished bubble came again in a later message",
                    )


def bubble_of(frame: dict) -> str:
    """The bubble a frame went to: a long connection's req_id (a message WeCom sent again has a bubble of its own on
    the same stream), else the stream id."""
    return frame.get("bubble") or frame["stream"]


def bubbles_of(frames: list[dict]) -> dict[str, list[dict]]:
    """The frames by bubble (bubble_of), each in order."""
    bubbles: dict[str, list[dict]] = defaultdict(list)
    for frame in frames:
        bubbles[bubble_of(frame)].append(frame)
    return bubbles


def judge_cards(verdict: Verdict, frames: list[dict]) -> None:
    """The cards the message's replies carried (a paused run's form): each the message's own form, and each once."""
    cards = [frame for frame in frames if frame.get("card")]
    verdict.cards = len(cards)
    if foreign := [frame["card_text"] for frame in cards if verdict.tag not in frame.get("card_text", "")]:
        verdict.problems.setdefault("unexpected", f"a card of another message: {foreign[0][:80]!r}")
    if twice := repeats([frame["card"] for frame in cards]):
        verdict.problems.setdefault("duplicate_deliveries", f"the card of form {twice[0]} in two replies")


def judge_posts(verdict: Verdict, sent: list[dict], posts: list[str]) -> None:
    """The messages sent for the answer besides its bubble: the same one twice (a note included) is a duplicate,
    and so is a post WeCom refused as a response_url's second (the gateway tried to deliver twice)."""
    if refused := [e for e in sent if not e.get("accepted", True)]:
        verdict.problems.setdefault(
            "duplicate_deliveries", f"{len(refused)} more post(s) to a response_url already used"
        )
    if len(set(posts)) < len(posts):
        verdict.problems.setdefault("duplicate_deliveries", "the same message was sent twice")


def judge_audit(verdict: Verdict, kinds: dict[str, list[dict]], rows: list[dict]) -> None:
    """The message's audit rows: one of its own (its bot, msgid and kind `message`), and what its rows say (its own,
    and any other carrying its text: a tap's, the rest after a form) is what its user was shown."""
    own = [row for row in kinds["audit_row"] if row["bot"] == verdict.bot and row["row"] == "message"]
    if len(own) != 1:
        verdict.problems["audit_rows"] = f"{len(own)} audit rows of its own"
        return
    if own[0].get("route", verdict.route) != verdict.route:  # (a history before routes has none)
        verdict.problems["audit_rows"] = f"its row names route {own[0]['route']!r}; the message took {verdict.route!r}"
        return
    texts = [own[0]["answer"] or ""]
    texts += [row["answer"] or "" for row in rows if row is not own[0] and verdict.tag in (row["answer"] or "")]
    said = {n for text in texts for t, n in sentences_in(text) if t == verdict.tag}
    notes = {key for key, note in CLEAR_NOTES.items() if key not in PROMISES and any(note in text for text in texts)}
    # (a note's words matter where the answer did not reach the user whole: a user who got it whole after a note, a
    # WeCom retry answered "unavailable" in a Redis outage, has a row of the whole answer; and that "unavailable" is
    # the reply to one delivery, not the answer's ending, where the message had a stream after all: its row is the
    # stream's, not the outage's, whose outcome is error; unless the stream too ended so, Redis failing its start)
    stream_row = own[0]["outcome"] != "error" and OUTAGE_NOTE not in notes
    endings = verdict.endings - ({OUTAGE_NOTE} if stream_row else set())
    if said != verdict.shown or (notes != endings and not verdict.whole):
        verdict.problems["audit_rows"] = (
            f"the row says {len(said)} sentences and notes {sorted(notes)}; its user was shown {len(verdict.shown)} "
            f"and {sorted(verdict.endings)}"
        )


def answer_part(text: str) -> str:
    """`text` without the gateway's notes and headers (what is left is answer text)."""
    for words in [*CLEAR_NOTES.values(), *HEADERS]:
        text = text.replace(words, "")
    return text.strip()


def allowed_calls(calls: list[float], frames: list[dict], tag: str, faults: list[dict]) -> tuple[int, int]:
    """How many Dify calls the message may have had, and how many of them were excused: one call, and a second (the
    documented restart) if the bubble had shown nothing of the answer before it and a fault that can cost a stream
    its replica was under way between the two."""
    if len(calls) < 2:
        return len(calls) or 1, 0
    first, restart_at = sorted(calls)[:2]
    shown_before = any(e["t"] < restart_at and any(t == tag for t, _ in sentences_in(e["content"])) for e in frames)
    restarting = any(
        f["fault"] in COSTS_LEASES
        and f.get("start", f["t"]) <= restart_at
        and f.get("end", f["t"]) + RESTART_REACH_SECONDS >= first
        for f in faults
    )
    return (1, 0) if shown_before or not restarting else (2, 1)


def touches(fault: dict, start: float, end: float) -> bool:
    """Whether `fault` overlapped [start, end] (a message's life, and the settling before it)."""
    return fault.get("start", fault["t"]) <= end and fault.get("end", fault["t"]) + SETTLE_SECONDS >= start


def on_path(fault: dict, message: dict, workers: set[int] | None) -> bool:
    """Whether `fault` strikes the message's own path: its replicas (`workers`; None: not known, any), its WeCom
    mode's way, or what every message goes through. Any Redis server's fault is on every path (FAULTS.md: one master
    holds every key on Sentinel; on the Cluster a message's known keys span all three shards for most messages, and
    some of its keys, its user's current token's, cannot be known here)."""
    kind = fault["fault"]
    if kind in HOLDER_FAULTS and message.get("mode") == "long_connection":
        return True  # every bubble of the bot's connection dies with its holder, whoever ran the answer
    if kind in REPLICA_KINDS:
        named = _REPLICA.match(fault.get("target", ""))
        return workers is None or (named is not None and int(named.group(1)) in workers)
    if kind in CONNECTION_KINDS:
        return message.get("mode") == "long_connection"
    if kind in CALLBACK_KINDS:
        return message.get("mode") != "long_connection"
    return kind not in WECOM_API_FAULTS  # (only the pushes and the ticks go that way)


def in_control(verdict: Verdict, calms: list[tuple[float, float]]) -> bool:
    """Whether the message is of the control group: sent in a calm phase, and touched by no fault."""
    return verdict.faults == ["none"] and any(start <= verdict.started <= end for start, end in calms)


def liveness(verdicts: list[Verdict]) -> dict[str, int]:
    """How many messages, answered whole, ended with a failure note."""
    return {
        "messages": len(verdicts),
        "whole": sum(v.whole for v in verdicts),
        "notes": sum(v.noted for v in verdicts),
    }


def active_faults(faults: list[dict], start: float, end: float) -> list[str]:
    """The kinds of the faults that overlapped [start, end] (a message's life, and the settling before it), or
    ["none"]."""
    kinds = sorted({f["fault"] for f in faults if touches(f, start, end)})
    return kinds or ["none"]


def summarize(verdicts: list[Verdict], faults: list[dict]) -> dict:
    result: dict = {"messages": len(verdicts)}
    for name in COUNTS:
        result[name] = sum(_count(v, name) for v in verdicts)
    endings: dict[str, int] = defaultdict(int)
    for verdict in verdicts:
        for note in verdict.notes:
            endings[note] += 1
    result["ended_with_note"] = dict(sorted(endings.items()))
    by_fault: dict[str, dict[str, int]] = defaultdict(
        lambda: {"runs": 0, "messages": 0, "whole": 0, "notes": 0, **{name: 0 for name in COUNTS}}
    )
    for fault in faults:
        by_fault[fault["fault"]]["runs"] += 1
    for verdict in verdicts:
        for kind in verdict.faults:
            row = by_fault[kind]
            row["messages"] += 1
            row["whole"] += verdict.whole
            row["notes"] += verdict.noted
            for name in COUNTS:
                row[name] += _count(verdict, name)
    result["by_fault"] = dict(sorted(by_fault.items()))
    apps: dict[str, list[Verdict]] = defaultdict(list)
    for verdict in verdicts:
        apps[verdict.app or "?"].append(verdict)
    # (`asked_whole`: those whose Dify call was not made to fail; `under_our_faults`: of those, the ones no fault of
    # Dify's link touched either, the answers the liveness goal is set for: whole under replica and Redis faults)
    result["by_app"] = {
        app: {
            **liveness(found),
            "asked_whole": liveness([v for v in found if not v.injected]),
            "under_our_faults": liveness([v for v in found if not v.injected and not DIFY_FAULTS & set(v.faults)]),
        }
        for app, found in sorted(apps.items())
    }
    routed = [verdict for verdict in verdicts if verdict.route]
    result["routed"] = {  # the messages a bot's route took: their counts are among the others', shown apart here
        "messages": len(routed),
        **{name: sum(_count(v, name) for v in routed) for name in COUNTS},
        **liveness(routed),
    }
    noted = [verdict for verdict in verdicts if verdict.noted]
    result["failure_notes"] = {"messages": len(noted), "dify_fault_injected": sum(v.injected for v in noted)}
    causes: dict[str, int] = defaultdict(int)
    for verdict in noted:  # a note with several causes on its path counts under each
        for cause in verdict.causes or ["unexplained"]:
            causes[cause] += 1
    result["notes_by_cause"] = dict(sorted(causes.items()))
    by_bot: dict[str, dict[str, int]] = defaultdict(lambda: {"messages": 0, **{name: 0 for name in COUNTS}})
    for verdict in verdicts:
        row = by_bot[verdict.bot or "?"]
        row["messages"] += 1
        for name in COUNTS:
            row[name] += _count(verdict, name)
    result["by_bot"] = dict(sorted(by_bot.items()))
    result["latency_s"] = {
        "first_text": _quantiles([v.first_text_s for v in verdicts if v.first_text_s is not None]),
        "last_text": _quantiles([v.last_text_s for v in verdicts if v.last_text_s is not None]),
    }
    result["excused_dify_calls"] = sum(v.excused_calls for v in verdicts)
    result["cards"] = {"messages": sum(v.cards > 0 for v in verdicts), "shown": sum(v.cards for v in verdicts)}
    result["faults"] = len(faults)
    result["lost_in_intake"] = sum("lost_in_intake" in v.problems for v in verdicts)
    # each with its bot, app and route: enough to tell its WeCom mode and backend when the history is gone (a CI run)
    result["problems"] = [
        {"msgid": v.msgid, "bot": v.bot, "app": v.app, "route": v.route, "faults": v.faults, **v.problems}
        for v in verdicts
        if v.problems
    ]
    return result


def _count(verdict: Verdict, name: str) -> int:
    """What `verdict` adds to the count `name`: its Dify calls beyond those allowed or unexplained, else 0 or 1."""
    if name == "extra_dify_calls":
        return verdict.extra_calls
    if name == "unexplained_dify_calls":
        return verdict.unexplained_calls
    return int(name in verdict.problems)


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 2),
        "p95": round(ordered[min(len(ordered) - 1, int(0.95 * (len(ordered) - 1) + 0.5))], 2),
        "max": round(ordered[-1], 2),
    }


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Check recorded histories again: each one's counts, and the messages behind every count that is not zero."""
    parser = argparse.ArgumentParser(description="Check fault-campaign histories again.")
    parser.add_argument("histories", nargs="+", type=Path, help="history.jsonl files (or gzipped)")
    results = {}
    for path in parser.parse_args(argv).histories:
        result = check(read(path))
        results[str(path)] = {name: result[name] for name in ("messages", "faults", *COUNTS, "lost_in_intake")}
        print(f"{path}: {', '.join(f'{name} {value}' for name, value in results[str(path)].items())}")
        for problem in result["problems"]:
            print(f"  {problem}")
    return results


if __name__ == "__main__":
    main()
