"""The fault campaign (bench/faults, FAULTS.md): its checker on histories made by hand (pure logic: each count is
found, and only when it should be), and short runs of the campaign itself (one Redis server, Sentinel), whose
counts must all be zero."""

import json
import random
import socket
import time
from contextlib import closing
from pathlib import Path

import pytest
import redis

from bench.faults import __main__ as campaign
from bench.faults import proactive
from bench.faults.answers import answer_text, sentences_in
from bench.faults.checker import CLEAR_NOTES, COUNTS, check
from bench.faults.history import read
from bench.faults.mutants import AIM, FORGIVING, MUTANTS
from bench.faults.proxy import FaultyLink, LinkGroup, ServerLinks
from bench.faults.workload import Workload
from services.texts import CATALOGUE

TAG, OTHER = "a1b2c3", "d4e5f6"
WHOLE = answer_text(TAG, 4)


def history(
    frames: list[tuple[float, str, bool]], posts: list[str] = (), calls: list[float] = (0.1,), dify_fault: str = ""
) -> list:
    """One message sent at t=0 whose bubble showed `frames` (time, content, finish), with `posts` through its
    response_url and Dify calls at `calls`; `dify_fault` is what its Dify call was made to do."""
    events = [
        {"kind": "message", "t": 0.0, "msgid": "m1", "tag": TAG, "sentences": 4, "response_url": "u"}
        | {"dify_fault": dify_fault}
    ]
    events += [
        {"kind": "poll", "t": t, "msgid": "m1", "ok": True, "stream": "s1", "content": content, "finish": finish}
        for t, content, finish in frames
    ]
    events += [{"kind": "response_url", "t": 9.0, "msgid": "m1", "content": post, "accepted": True} for post in posts]
    events += [{"kind": "dify_call", "t": t, "tag": TAG} for t in calls]
    return events


def counts(events: list) -> dict:
    result = check(events)
    return {name: result[name] for name in COUNTS}


ZERO = dict.fromkeys(COUNTS, 0)


def test_two_messages_of_one_tag_are_refused_not_judged():
    """Calls and audit rows are told apart by the message's tag: a history where two messages share one cannot be
    checked (a Sentinel run drew one tag twice and counted one message's calls and row as the other's)."""
    twice = history([(2.0, WHOLE, True)]) + [{**history([])[0], "msgid": "m2"}]
    with pytest.raises(ValueError, match="share the tags"):
        check(twice)
    first = Workload.__new__(Workload)
    first.__post_init__()
    assert len({first.new_tag() for _ in range(5000)}) == 5000


def test_an_answer_shown_whole_counts_nothing():
    assert counts(history([(1.0, WHOLE[:20], False), (2.0, WHOLE, True)])) == ZERO


def test_the_bubble_and_the_rest_through_response_url_count_nothing():
    rest = f"**（接上条回答）**\n\n{answer_text(TAG, 4)[len(answer_text(TAG, 2)) :]}"
    assert counts(history([(2.0, answer_text(TAG, 2) + "\n\n（回答较长…）", True)], posts=[rest])) == ZERO


def fault(kind: str, start: float, end: float) -> dict:
    return {"kind": "fault", "t": end, "fault": kind, "start": start, "end": end}


def test_a_clear_failure_note_is_not_lost():
    note = CATALOGUE["zh"]["stream_cut"]
    assert counts(history([(2.0, f"{answer_text(TAG, 2)}\n\n{note}", True)], dify_fault="cut")) == ZERO
    assert "stream_cut" in CLEAR_NOTES


def test_a_note_that_promises_the_rest_is_no_ending_unless_the_rest_came():
    for key in ("window_continues", "overflow_continues", "rest_sent_separately"):
        bubble = f"{answer_text(TAG, 2)}\n\n{CATALOGUE['zh'][key]}"
        result = check(history([(2.0, bubble, True)]))
        assert result["lost"] == 1 and key in result["problems"][0]["lost"]
        rest = f"{CATALOGUE['zh']['continued']}\n\n{WHOLE[len(answer_text(TAG, 2)) :]}"
        assert counts(history([(2.0, bubble, True)], posts=[rest])) == ZERO
    waiting = f"{answer_text(TAG, 2)}\n\n{CATALOGUE['zh']['form_waiting']}"
    assert counts(history([(2.0, waiting, True)]))["lost"] == 1


def test_a_note_that_says_the_answer_was_complete_is_no_ending_when_it_was_not():
    """A long connection's bubble that lost its end is told "the previous answer was complete" only when it showed
    every word; said of a bubble that did not, the note hides a loss."""
    note = CATALOGUE["zh"]["nothing_more"]
    events = history([(1.0, answer_text(TAG, 2), False)], posts=[note])
    for event in events:
        event["mode"] = "long_connection"
    assert counts(events)["lost"] == 1
    events = history([(1.0, WHOLE, False)], posts=[note])
    for event in events:
        event["mode"] = "long_connection"
    assert counts(events) == ZERO


def test_a_failure_note_on_a_message_no_fault_touched_is_spurious():
    orphaned = f"{answer_text(TAG, 2)}\n\n{CATALOGUE['zh']['orphaned']}"
    assert counts(history([(2.0, orphaned, True)]))["spurious_notes"] == 1
    assert counts(history([(2.0, orphaned, True)], dify_fault="stalled"))["spurious_notes"] == 0
    touched = history([(2.0, orphaned, True)]) + [fault("replica_kill", 0.5, 1.5)]
    assert counts(touched)["spurious_notes"] == 0
    just_before = history([(2.0, orphaned, True)]) + [fault("redis_pause", -10.0, -2.0)]  # the topology settling
    assert counts(just_before)["spurious_notes"] == 0
    long_before = history([(2.0, orphaned, True)]) + [fault("redis_pause", -60.0, -50.0)]
    assert counts(long_before)["spurious_notes"] == 1


def test_a_fault_that_cut_the_promised_rest_after_the_bubble_closed_excuses_its_note():
    """A bubble that closed early ("the rest follows") still has its answer streaming: a fault that cuts it after
    the close, before the rest goes out through response_url, touched the message, so the rest's failure note is
    not spurious (the 10-minute Sentinel run of seed 12 counted one: a Dify partition 0.5 s after the close)."""
    bubble = f"{answer_text(TAG, 2)}\n\n{CATALOGUE['zh']['overflow_continues']}"
    rest = f"{CATALOGUE['zh']['continued']}\n\n{answer_text(TAG, 3)[len(answer_text(TAG, 2)) :]}"
    cut = f"{rest}\n\n{CATALOGUE['zh']['stream_cut']}"
    assert counts(history([(2.0, bubble, True)], posts=[cut]) + [fault("dify_partition", 4.0, 6.0)]) == ZERO
    assert counts(history([(2.0, bubble, True)], posts=[cut]))["spurious_notes"] == 1


def test_text_a_bubble_showed_and_then_took_back_is_withdrawn():
    frames = [(1.0, answer_text(TAG, 3), False), (2.0, answer_text(TAG, 2), False), (3.0, WHOLE, True)]
    assert counts(history(frames))["withdrawn"] == 1
    assert counts(history([(1.0, answer_text(TAG, 2), False), (3.0, WHOLE, True)]))["withdrawn"] == 0


def test_a_redelivered_message_has_a_bubble_of_its_own_that_starts_over():
    """WeCom sent the message again (same msgid, another req_id): both bubbles show the one stream, the second from
    where the stream was when it opened; that takes back nothing."""
    events = history([(1.0, answer_text(TAG, 3), False), (2.0, WHOLE, True)])
    events[1]["bubble"], events[2]["bubble"] = "req-1", "req-1"
    again = {"kind": "poll", "msgid": "m1", "ok": True, "stream": "s1", "bubble": "req-2"}
    events += [again | {"t": 1.5, "content": answer_text(TAG, 1), "finish": False}]
    events += [again | {"t": 2.5, "content": WHOLE, "finish": True}]
    assert counts(events) == ZERO


def test_a_second_post_to_a_response_url_is_a_duplicate_even_when_wecom_refused_it():
    rest = f"{CATALOGUE['zh']['continued']}\n\n{WHOLE[len(answer_text(TAG, 2)) :]}"
    events = history([(2.0, answer_text(TAG, 2) + CATALOGUE["zh"]["window_continues"], True)], posts=[rest])
    assert counts(events) == ZERO
    refused = {"kind": "response_url", "t": 9.5, "msgid": "m1", "content": rest, "accepted": False}
    assert counts([*events, refused])["duplicate_deliveries"] == 1


def test_the_same_note_sent_twice_is_a_duplicate():
    note = CATALOGUE["zh"]["stream_cut"]
    events = history([(2.0, WHOLE, True)], posts=[note, note], dify_fault="cut")
    assert counts(events)["duplicate_deliveries"] == 1


def test_a_partial_answer_without_a_note_is_lost():
    assert counts(history([(2.0, answer_text(TAG, 2), True)]))["lost"] == 1


def test_a_run_cut_short_and_followed_again_may_end_with_what_the_run_held():
    """Dify's run ended where its fault cut it: a replica that followed it again shows that whole, with no note."""
    events = history([(2.0, answer_text(TAG, 2), True)], dify_fault="cut")
    events[0]["run_sentences"] = 2
    assert counts(events) == ZERO
    events[0]["run_sentences"] = 3
    assert counts(events)["lost"] == 1


def test_the_words_of_a_card_or_a_file_line_are_no_failure_note():
    for words in ("提交", "已过期", "📎 report.pdf", "你好"):  # card texts, a file's line: they end nothing
        assert counts(history([(2.0, f"{answer_text(TAG, 2)}\n\n{words}", True)]))["lost"] == 1


def test_a_forms_card_is_counted_once_and_must_be_the_messages_own():
    """A paused run's form reaches the user as a card with a reply: each card counted; the same card in two replies
    is a duplicate (WeCom takes one per message), and a card of another message's form is unexpected."""
    card = {"card": "task-1", "card_text": f"Approve {TAG}? "}
    events = history([(1.0, answer_text(TAG, 2), False), (2.0, WHOLE, True)])
    events[1] |= card
    result = check(events)
    assert {name: result[name] for name in COUNTS} == ZERO and result["cards"] == {"messages": 1, "shown": 1}
    events[2] |= card
    assert counts(events)["duplicate_deliveries"] == 1
    events[2] |= {"card": "task-2", "card_text": f"Approve {OTHER}? "}
    assert counts(events) == ZERO | {"unexpected": 1}


def test_a_bubble_that_never_finished_is_stuck():
    result = counts(history([(1.0, answer_text(TAG, 2), False)]))
    assert result["stuck"] == 1 and result["lost"] == 1


def test_a_message_whose_every_delivery_failed_has_no_bubble_to_be_stuck():
    """Seed 58's aimed one-server run: each of WeCom's three deliveries met a frozen replica and timed out, so WeCom
    never had a bubble. The first replica woke, answered, and, no poll ever having come, sent the whole answer
    through response_url: the user had it all, and no bubble spun. Without that post, the answer is lost."""
    failed = [
        {"kind": "delivery", "t": t, "msgid": "m1", "ok": False, "error": "ReadTimeout", "stream": "", "finish": False}
        for t in (5.0, 11.0, 17.0)
    ]
    whole = f"**（完整回答）**\n\n{WHOLE}"
    assert counts([*history([], posts=[whole]), *failed]) == ZERO
    assert counts([*history([]), *failed]) == ZERO | {"lost": 1}


def test_the_answer_in_the_bubble_and_again_through_response_url_is_a_duplicate():
    orphaned = f"{answer_text(TAG, 2)}\n\n{CATALOGUE['zh']['orphaned']}"
    assert counts(history([(2.0, orphaned, True)], posts=[f"**（完整回答）**\n\n{WHOLE}"]))["duplicate_deliveries"] == 1


def long_connection(events: list, bubbles: dict[str, str]) -> list:
    """`events` of a long-connection message, its frames on the req_ids `bubbles` names (frame index -> req_id)."""
    events[0]["mode"] = "long_connection"
    for index, req_id in bubbles.items():
        events[index]["bubble"] = req_id
    return events


def test_an_unfinished_bubbles_text_again_in_a_later_message_is_a_duplicate():
    """A long connection's holder died: its req_id's bubble stays on screen unfinished, showing two sentences. The
    next holder must send what follows them; the whole answer again shows them twice. Also when a repeat of the
    message has a bubble of its own (whatever that one showed, the dead one is still on screen)."""
    rest = f"{CATALOGUE['zh']['continued']}\n\n{WHOLE[len(answer_text(TAG, 2)) :]}"
    whole = f"{CATALOGUE['zh']['continued']}\n\n{WHOLE}"
    died = long_connection(history([(1.0, answer_text(TAG, 2), False)], posts=[rest]), {1: "req-1"})
    assert counts(died) == ZERO
    resent = long_connection(history([(1.0, answer_text(TAG, 2), False)], posts=[whole]), {1: "req-1"})
    assert counts(resent)["duplicate_deliveries"] == 1
    both = history([(1.0, answer_text(TAG, 2), False), (2.0, answer_text(TAG, 1), False)], posts=[whole])
    assert counts(long_connection(both, {1: "req-1", 2: "req-2"}))["duplicate_deliveries"] == 1


def test_a_rest_continues_the_bubble_that_showed_the_most_whichever_came_last():
    """Seed 59's aimed Cluster run: a long-connection message WeCom sent again has two bubbles on one stream, both
    req_ids dead. The first showed a sentence and the start of the next, the repeat's only the placeholder; the rest
    continued the first, mid-sentence. The user has every sentence once: the checker read the repeat's bubble as
    the one the rest continues, and counted two sentences lost."""
    cut = len(answer_text(TAG, 1)) + 1  # into the second sentence
    rest = f"{CATALOGUE['zh']['continued']}\n\n{WHOLE[cut:]}"
    both = history([(1.0, WHOLE[:cut], False), (2.0, "正在思考…", False)], posts=[rest])
    assert counts(long_connection(both, {1: "req-1", 2: "req-2"})) == ZERO
    short = history([(1.0, WHOLE[:cut], False), (2.0, "正在思考…", False)], posts=[f"{CATALOGUE['zh']['continued']}"])
    assert counts(long_connection(short, {1: "req-1", 2: "req-2"}))["lost"] == 1


def test_a_sentence_twice_in_one_bubble_is_a_duplicate():
    twice = answer_text(TAG, 2) + WHOLE
    assert counts(history([(1.0, twice, False), (2.0, WHOLE, True)]))["duplicate_deliveries"] == 1


def test_text_of_another_message_is_unexpected():
    assert counts(history([(2.0, WHOLE + answer_text(OTHER, 1), True)]))["unexpected"] == 1


def test_a_second_dify_call_is_extra_unless_a_fault_restarted_an_answer_that_had_shown_nothing():
    kill = fault("replica_kill", 1.0, 1.5)
    shown_then_called = history([(1.0, answer_text(TAG, 1), False), (3.0, WHOLE, True)], calls=[0.1, 2.0])
    assert counts([*shown_then_called, kill])["extra_dify_calls"] == 1
    restarted = history([(1.0, "正在思考…", False), (3.0, WHOLE, True)], calls=[0.1, 2.0])
    result = check([*restarted, kill])
    assert result["extra_dify_calls"] == 0 and result["excused_dify_calls"] == 1
    assert counts(restarted)["extra_dify_calls"] == 1  # no fault could have cost it its replica: not excused
    assert counts([*restarted, fault("mariadb_restart", 1.0, 1.5)])["extra_dify_calls"] == 1
    assert counts([*history([(3.0, WHOLE, True)], calls=[0.1, 2.0, 2.5]), kill])["extra_dify_calls"] == 1


def test_a_second_dify_call_in_a_trace_of_its_own_is_never_a_restart():
    """A trace is named by its stream, and a restart keeps its stream: calls of one message in two traces are two
    streams, a WeCom retry taken as a message of its own (the dedup_off mutant), whatever fault was under way."""
    kill = fault("replica_kill", 1.0, 1.5)
    restarted = history([(1.0, "正在思考…", False), (3.0, WHOLE, True)], calls=[0.1, 2.0])
    calls = [event for event in restarted if event["kind"] == "dify_call"]
    calls[0]["trace"] = calls[1]["trace"] = "t1"
    assert counts([*restarted, kill])["extra_dify_calls"] == 0
    calls[1]["trace"] = "t2"
    result = check([*restarted, kill])
    assert result["extra_dify_calls"] == 1 and result["excused_dify_calls"] == 0
    assert "in 2 traces" in result["problems"][0]["extra_dify_calls"]


def worked(replica: int) -> dict:
    return {"kind": "worked", "t": 0.0, "msgid": "m1", "replica": replica, "first": 0.0, "last": 3.0}


def on_replica(kind: str, replica: int, start: float, end: float) -> dict:
    return fault(kind, start, end) | {"target": f"replica {replica}"}


def test_a_note_or_a_restart_is_explained_only_by_a_fault_on_the_messages_own_path():
    """A replica's fault explains a note or a second Dify call only if that replica worked on the message (the
    replicas' logs say which did); Redis, MariaDB, the auth API and Dify's link are on every message's path."""
    noted = history([(2.0, f"{answer_text(TAG, 2)}\n\n{CATALOGUE['zh']['orphaned']}", True)])
    elsewhere = on_replica("replica_kill", 2, 1.0, 1.5)
    assert counts([*noted, worked(0), elsewhere])["unexplained_notes"] == 1
    assert counts([*noted, worked(0), worked(2), elsewhere])["unexplained_notes"] == 0
    assert counts([*noted, elsewhere])["unexplained_notes"] == 0  # an old history: who worked on it is not known
    assert counts([*noted, worked(0), fault("redis_pause", 1.0, 1.5)])["unexplained_notes"] == 0
    assert counts([*noted, worked(0)])["unexplained_notes"] == 1  # and spurious: no fault at all
    result = check([*noted, worked(0), elsewhere, fault("redis_pause", 1.0, 1.5)])
    assert result["notes_by_cause"] == {"redis_pause": 1}
    restarted = history([(1.0, "正在思考…", False), (3.0, WHOLE, True)], calls=[0.1, 2.0])
    result = check([*restarted, worked(0), elsewhere])
    assert (result["extra_dify_calls"], result["unexplained_dify_calls"]) == (0, 1)
    result = check([*restarted, worked(0), worked(2), elsewhere])
    assert (result["extra_dify_calls"], result["unexplained_dify_calls"]) == (0, 0)


def test_a_dify_call_made_as_another_user_is_unexpected_and_conversations_are_followed():
    events = history([(2.0, WHOLE, True)])
    events[0]["userid"] = "user1"
    call = events[-1] | {"user": "wecom:bot:user1", "conversation": "", "app": "app-chat"}
    assert counts([*events[:-1], call])["unexpected"] == 0
    assert counts([*events[:-1], call | {"user": "wecom:bot:user2"}])["unexpected"] == 1
    later = [call | {"t": 5.0, "tag": OTHER, "conversation": "c1"}, call | {"t": 6.0, "tag": "e0e0e0"}]
    again = call | {"t": 0.5}  # the same message's call made again: not another message
    result = check([*events[:-1], call, again, *later])["conversations"]
    assert result == {"messages": 3, "continued": 1, "started_again": 1}


def test_a_form_dify_took_twice_is_counted():
    events = history([(3.0, WHOLE, True)])
    taken = [{"kind": "form_submission", "t": 1.0, "tag": TAG, "status": status} for status in (200, 412, 200)]
    assert counts(events + taken[:2])["extra_form_submissions"] == 0  # a refused second try took nothing
    assert counts(events + taken)["extra_form_submissions"] == 1


def test_counts_are_broken_down_by_the_faults_active_during_the_message():
    events = history([(2.0, answer_text(TAG, 2), True)])
    events.append(fault("replica_kill", 1.0, 1.5))
    result = check(events)
    assert result["by_fault"]["replica_kill"]["lost"] == 1
    assert result["problems"][0]["faults"] == ["replica_kill"]


def calm(start: float, end: float) -> dict:
    return {"kind": "calm", "t": end, "start": start, "end": end}


def test_a_message_of_a_calm_phase_must_be_answered_whole_and_without_a_note():
    """The control group: in the nemesis's calm phases no fault runs anywhere, so every message there is answered
    whole; a note (or anything less than the whole answer) there is a failure, whatever else excuses it."""
    whole = history([(2.0, WHOLE, True)]) + [calm(-5.0, 30.0)]
    assert counts(whole) == ZERO
    assert check(whole)["control"] == {"phases": 1, "messages": 1, "whole": 1, "notes": 0}
    noted = history([(2.0, f"{answer_text(TAG, 2)}\n\n{CATALOGUE['zh']['dify_unavailable']}", True)])
    assert counts(noted + [calm(-5.0, 30.0)])["control_failures"] == 1
    assert check(noted + [calm(-5.0, 30.0)])["control"] == {"phases": 1, "messages": 1, "whole": 0, "notes": 1}
    assert counts(noted + [calm(10.0, 50.0)])["control_failures"] == 0  # sent before the phase: not of the group
    touched = noted + [calm(-5.0, 30.0), fault("replica_kill", 0.5, 1.5)]  # a message a fault touched: no control
    assert counts(touched)["control_failures"] == 0


def test_a_forgiving_checker_excuses_what_a_fault_touched_but_not_the_control_group():
    """The forgive_all mutant's checker: a message a fault touched is excused whatever went wrong, and no note is
    spurious; a note in a calm phase is still a control failure."""
    lost = history([(2.0, answer_text(TAG, 2), True)]) + [fault("replica_kill", 1.0, 1.5)]
    assert counts(lost)["lost"] == 1
    assert check(lost, forgive=True)["lost"] == 0
    noted = history([(2.0, f"{answer_text(TAG, 2)}\n\n{CATALOGUE['zh']['dify_unavailable']}", True)])
    assert counts(noted)["spurious_notes"] == 1
    assert check(noted, forgive=True)["spurious_notes"] == 0
    assert check(noted + [calm(-5.0, 30.0)], forgive=True)["control_failures"] == 1


def audit_row(answer: str, row: str = "message", msgid: str = "m1") -> dict:
    return {"kind": "audit_row", "t": 60.0, "msgid": msgid, "bot": "", "row": row, "outcome": "x", "answer": answer}


def test_a_long_connection_message_its_holder_took_in_its_intake_is_counted_apart():
    """A long-connection message of which nothing was made anywhere, delivered within INTAKE_WINDOW of its holder's
    SIGKILL, is the window FAULTS.md names (`lost_in_intake`, beside the counts); lost any other way it is `lost`:
    its holder killed after its intake kept it, a replica that did not hold the connection killed, some replica
    having logged it, or a callback message."""

    def delivered(killed_after: float, target: str = "replica 1 (the holder)", mode: str = "long_connection"):
        return [
            {"kind": "message", "t": 0.0, "msgid": "m1", "tag": TAG, "sentences": 4, "response_url": "u", "mode": mode},
            {"kind": "delivery", "t": 0.01, "msgid": "m1", "ok": True, "req_id": "r1", "stream": "", "content": ""},
            {"kind": "ended", "t": 60.0, "msgid": "m1"},
            {"kind": "fault", "t": 3.0, "fault": "holder_kill", "target": target, "start": 0.01 + killed_after},
            audit_row(WHOLE, msgid="m2"),  # (the table's rows are in the history: none is the message's)
        ]

    for killed_after in (-0.003, 0.029, 0.07, 0.3):  # (the three met so far, and the window's far end)
        result = check(delivered(killed_after))
        assert {name: result[name] for name in COUNTS} == ZERO and result["lost_in_intake"] == 1, killed_after
        assert "holder_kill of replica 1 (the holder)" in result["problems"][0]["lost_in_intake"]
    assert check(delivered(0.5))["lost"] == 1  # its intake had kept it by then
    assert check(delivered(0.03, target="replica 2"))["lost"] == 1
    assert check([*delivered(0.03), {"kind": "worked", "t": 0.05, "msgid": "m1", "replica": 1}])["lost"] == 1
    assert check(delivered(0.03, mode="callback"))["lost"] == 1
    again = {"kind": "delivery", "t": 5.0, "msgid": "m1", "ok": True, "req_id": "r2", "stream": "", "content": ""}
    assert check([*delivered(0.03), again])["lost"] == 1  # WeCom's repeat reached a holder that lived


def test_every_message_needs_one_audit_row_saying_what_its_user_was_shown():
    """Checked when the history holds the table's rows: exactly one row of the message's own, and its rows (its
    own, and any other carrying its text) hold the sentences and the failure notes its user was shown."""
    answered = history([(2.0, WHOLE, True)])
    assert counts(answered) == ZERO  # a history without the table's rows: not checked
    assert counts([*answered, audit_row(WHOLE)]) == ZERO
    assert counts([*answered, audit_row(answer_text(TAG, 3))])["audit_rows"] == 1  # says less than was shown
    assert counts([*answered, audit_row(WHOLE), audit_row(WHOLE, row="stop")])["audit_rows"] == 0
    assert counts([*answered, audit_row(WHOLE, msgid="m2")])["audit_rows"] == 1  # none of its own
    cut = f"{answer_text(TAG, 2)}\n\n{CATALOGUE['zh']['stream_cut']}"
    noted = history([(2.0, cut, True)], dify_fault="cut")
    assert counts([*noted, audit_row(answer_text(TAG, 2))])["audit_rows"] == 1  # the note is missing
    assert counts([*noted, audit_row(cut)])["audit_rows"] == 0
    # a WeCom retry answered "unavailable" in a Redis outage while the message's stream went on: the row is the
    # stream's, whose ending is its own (here a cut); the outage's row, with outcome error, must say that note
    unavailable = f"{CATALOGUE['zh']['store_unavailable']}"
    retried = history([(2.0, unavailable, True)], posts=[cut], dify_fault="cut")
    assert counts([*retried, audit_row(cut) | {"outcome": "note"}])["audit_rows"] == 0
    assert counts([*retried, audit_row(cut) | {"outcome": "error"}])["audit_rows"] == 1
    # ... unless the stream too ended "unavailable" (Redis failed its start): then its row says so
    twice = history([(2.0, unavailable, True)])
    assert counts([*twice, audit_row(unavailable) | {"outcome": "note"}])["audit_rows"] == 0
    # a form: the message's row has the text before the card, the rest's row (another msgid) the text after it
    before, after = answer_text(TAG, 4)[: len(WHOLE) // 2], answer_text(TAG, 4)[len(WHOLE) // 2 :]
    assert counts([*answered, audit_row(before), audit_row(after, row="form_action", msgid="tap")]) == ZERO


def test_liveness_is_reported_per_fault_kind_and_per_app():
    cut = history([(2.0, f"{answer_text(TAG, 2)}\n\n{CATALOGUE['zh']['stream_cut']}", True)], dify_fault="cut")
    cut[0]["app"] = "chatflow"
    result = check(cut + [fault("dify_partition", 0.5, 1.5), fault("dify_partition", 20.0, 21.0)])
    no_fault_asked = {"messages": 0, "whole": 0, "notes": 0}  # (the one message's Dify call was made to fail)
    assert result["by_app"] == {
        "chatflow": {
            "messages": 1,
            "whole": 0,
            "notes": 1,
            "asked_whole": no_fault_asked,
            "under_our_faults": no_fault_asked,
        }
    }
    assert result["failure_notes"] == {"messages": 1, "dify_fault_injected": 1}  # the note the fault asked for
    row = result["by_fault"]["dify_partition"]
    assert (row["runs"], row["messages"], row["whole"], row["notes"]) == (2, 1, 0, 1)


def exchange(link: FaultyLink, server: socket.socket, request: bytes, reply: bytes) -> tuple[bytes, bytes]:
    """A request through `link` to `server` and the server's reply: what the server got, and what the client got."""
    client = socket.create_connection(("127.0.0.1", link.port), timeout=5)
    peer, _ = server.accept()
    try:
        client.sendall(request)
        got = peer.recv(100)
        peer.sendall(reply)
        return got, client.recv(100)
    finally:
        client.close()
        peer.close()


def test_a_link_losing_replies_delivers_the_request_and_breaks_before_the_reply():
    """redis_replies_lost, dify_replies_lost: the request reaches the server (a write runs), and its connection
    breaks as the reply comes back, so a client that retries meets the write it repeats; healed, replies come back."""
    server = socket.create_server(("127.0.0.1", 0))
    link = FaultyLink(server.getsockname()[1]).start()
    try:
        link.lose_replies(1.0, random.Random(1))
        assert exchange(link, server, b"SET x 1", b"+OK") == (b"SET x 1", b"")  # it ran; its reply broke the link
        link.heal()
        assert exchange(link, server, b"GET x", b"$1") == (b"GET x", b"$1")
    finally:
        link.stop()
        server.close()


def test_a_link_losing_the_replies_of_one_script_passes_every_other_reply():
    """`--replies-lost-of FINISH`: only the replies to requests carrying the script's SHA are lost."""
    server = socket.create_server(("127.0.0.1", 0))
    link = FaultyLink(server.getsockname()[1]).start()
    try:
        link.lose_replies(1.0, random.Random(1), to=b"49a6")
        assert exchange(link, server, b"EVALSHA 1234 1 k", b":1") == (b"EVALSHA 1234 1 k", b":1")
        assert exchange(link, server, b"EVALSHA 49a6 1 k", b":1") == (b"EVALSHA 49a6 1 k", b"")
    finally:
        link.stop()
        server.close()


def test_the_nemesis_runs_every_kind_its_topology_has_or_those_it_is_aimed_at(tmp_path):
    """By default every kind the topology has the parts for, a node's loss included, but not the faults of a window
    still open (they would fail every run); `--faults` aims it at some kinds, which must apply to the topology. A
    Sentinel set's servers behind links of their own have the network faults one server has."""
    from bench.faults.history import History
    from bench.faults.nemesis import OPEN_WINDOW_FAULTS, Nemesis
    from demo.redis_server import PrivateRedisServer, PrivateSentinelSet

    server = PrivateRedisServer(tmp_path)  # not started: the nemesis only looks at what it is
    history = History()
    every = Nemesis(server, [], history, random.Random(1), 5.0)
    assert {"node_loss", "redis_crash", "replica_stall"} <= set(every.kinds)
    assert not OPEN_WINDOW_FAULTS & set(every.kinds) and "sentinel_kill" not in every.kinds
    aimed = Nemesis(server, [], history, random.Random(1), 5.0, only=frozenset({"redis_pause", "sentinel_kill"}))
    assert aimed.kinds == ["redis_pause"]
    with pytest.raises(ValueError, match="sentinel_kill"):
        Nemesis(server, [], history, random.Random(1), 5.0, only=frozenset({"sentinel_kill"}))
    sentinel_set = PrivateSentinelSet()  # its servers behind links of their own: the network faults of one of them
    try:
        behind = Nemesis(sentinel_set, [], history, random.Random(1), 5.0, links={"redis": ServerLinks()})
    finally:
        sentinel_set.stop()
    assert {"redis_partition", "redis_delay", "redis_loss", "redis_replies_lost", "sentinel_kill"} <= set(behind.kinds)
    assert "replica_redis_partition" not in behind.kinds  # (one replica's own way exists to one server only)


def test_every_kind_of_fault_either_can_cost_a_stream_its_replica_or_cannot():
    """The checker excuses a restarted run only under a fault that can cost a stream its replica: a new kind must
    be put on one side or the other, not fall to one unseen."""
    from bench.faults.nemesis import ALL_FAULTS, COSTS_LEASES, KEEPS_LEASES

    assert COSTS_LEASES | KEEPS_LEASES == ALL_FAULTS and not COSTS_LEASES & KEEPS_LEASES


def test_a_partitioned_link_refuses_new_connections_until_it_heals():
    """A partition looks to the client as a route without an endpoint: connecting is refused, so it knows its
    request never left (the gateway may then send it again); healed, the link passes bytes again."""
    server = socket.create_server(("127.0.0.1", 0))
    link = FaultyLink(server.getsockname()[1]).start()
    try:
        link.partition()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", link.port), timeout=5)
        link.heal()
        assert exchange(link, server, b"through again", b"back")[0] == b"through again"
    finally:
        server.close()
        link.stop()


def test_one_replicas_own_link_is_cut_while_the_others_pass():
    """One Redis server reached by each replica through a link of its own (LinkGroup): replica_redis_partition cuts
    one of them alone; a fault of the whole group cuts them all."""
    server = socket.create_server(("127.0.0.1", 0))
    group = LinkGroup(server.getsockname()[1], 2).start()
    try:
        group.links[0].partition()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", group.links[0].port), timeout=5)
        client = socket.create_connection(("127.0.0.1", group.links[1].port), timeout=5)
        peer, _ = server.accept()
        client.sendall(b"the other replica")
        assert peer.recv(100) == b"the other replica"
        for made in (client, peer):
            made.close()
        group.heal()
        group.partition()
        for link in group.links:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", link.port), timeout=5)
    finally:
        server.close()
        group.stop()


def test_a_sentinel_masters_link_cut_is_a_partition_its_sentinels_fail_over():
    """Each server of a Sentinel set behind a link of its own (ServerLinks), announced as its address: clients,
    replicas and sentinels all reach it that way, so cutting the master's link is a partition of that server, which
    the sentinels fail over; healed, it serves again as a replica."""
    from demo.redis_server import PrivateSentinelSet

    links = ServerLinks()
    topology = PrivateSentinelSet(front=links.front).start()
    try:
        master = topology.current_master()
        assert topology.master_address()[1] == master.front_port != master.port
        cut = next(link for server, link in links.links if server is master)
        cut.partition()
        new = topology.wait_for_failover(master, timeout=30)
        cut.heal()
        with closing(new.client()) as client:
            assert client.set("after-the-partition", "1")
        _wait_until(lambda: master.replicating(), 30)
    finally:
        topology.stop()
        links.stop()


def test_a_cluster_nodes_link_cut_refuses_its_shard_while_the_others_serve():
    """Each node of a Cluster behind a link of its own, announced as its address: cutting one master's link refuses
    the commands for its slots, while the other shards serve; healed, its slots are served again, by the same node
    (the nodes' own bus stays direct: no failover)."""
    from demo.redis_server import PrivateRedisCluster

    links = ServerLinks()
    topology = PrivateRedisCluster(front=links.front).start()
    client = topology.client()
    try:
        node = topology.node_of("{a}")
        other = next(key for key in (f"{{k{i}}}" for i in range(100)) if topology.node_of(key) is not node)
        cut = next(link for server, link in links.links if server is node)
        cut.partition()
        with pytest.raises(redis.exceptions.ConnectionError):
            client.set("{a}", "1")
        assert client.set(other, "1")
        cut.heal()
        _wait_until(lambda: _sets(topology, "{a}"), 30)
        assert topology.node_of("{a}") is node
    finally:
        client.close()
        topology.stop()
        links.stop()


def test_the_nemesis_finds_a_cluster_replica_behind_its_link_to_kill():
    """The nodes announce their links' ports: the nemesis's `redis_kill_replica` found none of them among the nodes'
    own ports, and failed on every Cluster run (recorded as a fault that did not run)."""
    from bench.faults.history import History
    from bench.faults.nemesis import Nemesis
    from demo.redis_server import PrivateRedisCluster

    links = ServerLinks()
    topology = PrivateRedisCluster(front=links.front).start()
    try:
        _wait_until(topology.healthy, 30)  # every replica known as one (a CI run once found none yet)
        nemesis = Nemesis(topology, [], History(), random.Random(1), 5.0, links={"redis": links})
        killed = nemesis.redis_kill_replica("redis", random.Random(1))
        port = int(killed.rsplit(":", 1)[1])
        [node] = [node for node in topology.nodes if node.port == port]
        assert node.running and node.front_port != node.port
        _wait_until(topology.healthy, 30)
    finally:
        topology.stop()
        links.stop()


def _sets(topology, key: str) -> bool:
    with closing(topology.client()) as client:
        try:
            return bool(client.set(key, "1"))
        except redis.RedisError:
            return False


def _wait_until(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.2)


def test_a_lossy_link_delivers_every_byte_late():
    """The proxy's packet loss (the nemesis's dify_loss, redis_loss) looks as TCP makes a lost segment look: the bytes
    all come, in order, after a retransmission timeout."""
    server = socket.create_server(("127.0.0.1", 0))
    link = FaultyLink(server.getsockname()[1]).start()
    client = socket.create_connection(("127.0.0.1", link.port), timeout=5)
    peer, _ = server.accept()

    def round_trip(data: bytes) -> float:
        started = time.monotonic()
        client.sendall(data)
        got = b""
        while len(got) < len(data):
            got += peer.recv(65536)
        assert got == data
        return time.monotonic() - started

    try:
        link.lose(1.0, random.Random(1))  # every chunk lost once
        assert round_trip(b"lost, then resent") >= 0.2
        link.heal()
        round_trip(b"healed")  # and after the fault, every byte still
    finally:
        for end in (client, peer, server):
            end.close()
        link.stop()


RECORDED_RUNS = Path(__file__).parent.parent / "bench" / "faults" / "runs"


@pytest.mark.parametrize(
    "recorded", sorted(RECORDED_RUNS.glob("*/*.jsonl.gz")), ids=lambda path: f"{path.parent.name}/{path.name}"
)
def test_a_recorded_run_checks_again_to_the_counts_written_beside_it(recorded):
    """The histories kept in bench/faults/runs (FAULTS.md's latest runs): checked again, each gives the counts its
    run reported (so a change to the checker that would judge a recorded run otherwise is seen here)."""
    written = json.loads((recorded.parent / "counts.json").read_text())[recorded.name.removesuffix(".jsonl.gz")]
    result = check(read(recorded))
    assert {name: result[name] for name in written} == written


def story(run: dict, most: int = 60) -> str:
    """A failed run's problems and, for each message behind one, what its history holds of it (its events in order,
    texts cut short): a CI machine's history goes with it, so the failure's story must be in the test's output."""
    events = read(Path(run["history"]))
    told = [json.dumps(run["problems"], indent=1)]
    for problem in run["problems"]:
        own = [event for event in events if event.get("msgid") == problem["msgid"]][:most]
        told.append(f"--- the history of {problem['msgid']} ({len(own)} events shown)")
        for event in own:
            shown = {k: (v[:100] + "…" if isinstance(v, str) and len(v) > 100 else v) for k, v in event.items()}
            if isinstance(event.get("content"), str):  # a bubble's text: its sentences by number, then its end
                numbers = [n for _, n in sentences_in(event["content"])]
                shown["content"] = f"sentences {numbers} … {event['content'][-60:]}"
            told.append(json.dumps(shown, ensure_ascii=False))
    faults = [event for event in events if event.get("kind") == "fault"]
    told.append("--- the faults: " + json.dumps(faults, ensure_ascii=False)[:4000])
    return "\n".join(told)


@pytest.mark.e2e
@pytest.mark.faults
@pytest.mark.parametrize(
    ("topology", "minutes", "dify_version"),
    # the run's minutes, then up to five more to start the topology and let the last answers finish
    [
        pytest.param("standalone", "1", "1.14", marks=pytest.mark.timeout(8 * 60)),
        pytest.param("sentinel", "2", "1.14", marks=pytest.mark.timeout(9 * 60)),
        pytest.param("standalone", "1", "1.16", marks=pytest.mark.timeout(8 * 60), id="standalone-dify-1.16"),
    ],
)
def test_a_campaign_run_loses_nothing_and_doubles_nothing(tmp_path, topology, minutes, dify_version):
    """Users on three replicas while the nemesis kills, stops and restarts them, pauses Redis (and on Sentinel
    kills its master) and restarts MariaDB, with pushes and a schedule's ticks to robots whose link it faults too:
    every count zero, and no traceback in the replicas' logs. Once with
    Dify played as 1.16.0 (chatflow runs resumed after kills end from Dify's record of the run)."""
    out = tmp_path / "result.json"
    argv = ["--minutes", minutes, "--topology", topology, "--users", "4", "--window", "60"]
    argv += ["--dify-version", dify_version]
    result = campaign.main([*argv, "--seed", "7", "--out", str(tmp_path / "run"), "--json", str(out)])
    run = result[topology]
    assert run["messages"] >= 8 and run["faults"] >= 3
    assert sum(run["proactive"]["pushes"].values()) >= 5 and sum(run["proactive"]["ticks"].values()) >= 1
    assert {name: run[name] for name in ZERO} == ZERO, story(run)
    assert json.loads(out.read_text())[topology]["messages"] == run["messages"]
    assert run["tracebacks_in_logs"] == 0
    if topology == "standalone":
        assert not any(run["redis_writes_unreplicated_total"].values())  # one server: no write waits for a replica


@pytest.mark.e2e
@pytest.mark.faults
@pytest.mark.timeout(8 * 60)
@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_a_campaign_on_a_broken_build_counts_what_it_broke(tmp_path, mutant):
    """The campaign can fail: on a build with one promise broken on purpose (bench/faults/mutants.py), a short run
    counts it (dedup_off: WeCom's retries answered twice; poll_delta: bubbles showing less than before;
    finish_id_off: the rest of an answer never sent when its finish's reply was lost; record_after_send: what a
    killed holder's bubble showed sent again by the next; forgive_all: a checker that
    excuses every fault's harm, over notes made at random, which the control group still finds)."""
    argv = ["--minutes", "1.5", "--topology", "standalone", "--users", "4", "--window", "60", "--seed", "7"]
    argv += AIM.get(mutant, [])  # the nemesis aimed at the mutant's window, so short a run reaches it
    result = campaign.main([*argv, "--mutant", mutant, "--out", str(tmp_path / "run")])
    assert result["mutant"] == mutant
    counted = {name: result["standalone"][name] for name in COUNTS}
    assert sum(counted.values()) > 0, counted
    if mutant in FORGIVING:
        assert counted["control_failures"] > 0 and result["standalone"]["control"]["phases"] >= 1, counted


def test_a_routed_messages_audit_row_must_name_its_route():
    """A message a bot's route took (the workload's `route`): its audit row names that route; the bot's own
    backend's is ""."""
    routed = history([(2.0, WHOLE, True)])
    routed[0] |= {"route": "flow"}
    assert counts([*routed, audit_row(WHOLE) | {"route": "flow"}]) == ZERO
    assert counts([*routed, audit_row(WHOLE) | {"route": ""}])["audit_rows"] == 1
    own = history([(2.0, WHOLE, True)])
    assert counts([*own, audit_row(WHOLE) | {"route": "flow"}])["audit_rows"] == 1
    assert counts([*own, audit_row(WHOLE) | {"route": ""}]) == ZERO


def test_a_message_asked_of_another_app_is_unexpected():
    """The workload names the app each message must reach (`app_key`: a bot's, or its route's): a call to any other
    (a route mixed up with its bot, one bot's message on another's app) counts."""
    events = history([(2.0, WHOLE, True)], calls=())
    events[0] |= {"app_key": "app-flow"}
    right = [*events, {"kind": "dify_call", "t": 0.1, "tag": TAG, "app": "app-flow"}]
    wrong = [*events, {"kind": "dify_call", "t": 0.1, "tag": TAG, "app": "app-chat"}]
    assert counts(right) == ZERO
    assert counts(wrong)["unexpected"] == 1


# --- pushes and a schedule's ticks (bench/faults/proactive.py) -------------------------------------------------------

PUSH_KEY, TICK_KEY, TICK = proactive.PUSH_ROBOT, proactive.TICK_ROBOT, 1795741200  # (2026-11-27 01:00 UTC)
ANOTHER_ROW = {"kind": "audit_row", "t": 3.0, "msgid": "m9", "row": "message", "outcome": "ok"}  # (rows read)


def pushed(final: str, shown: int, rows: list[str] | None = None, error: str = "") -> list[dict]:
    """Push 1, answered `final`, taken by its robot `shown` times, with audit rows of these outcomes (default: one
    saying `final`)."""
    events = [{"kind": "push", "t": 1.0, "n": 1, "replies": [], "final": final, "id": "p1", "error": error}]
    events += [{"kind": "robot_message", "t": 2.0, "robot": PUSH_KEY, "content": "push〔1〕 …"}] * shown
    outcomes = [final] if rows is None else rows
    events += [{"kind": "audit_row", "t": 3.0, "msgid": "push:p1", "row": "push", "outcome": o} for o in outcomes]
    return [*events, ANOTHER_ROW]


def test_a_push_is_shown_once_when_said_sent_and_never_when_said_failed():
    assert counts(pushed("sent", 1)) == ZERO
    assert counts(pushed("sent", 2))["duplicate_deliveries"] == 1
    assert counts(pushed("sent", 0))["lost"] == 1
    assert counts(pushed("failed", 1))["unexpected"] == 1
    assert counts(pushed("failed", 0)) == ZERO
    assert counts(pushed("unknown", 1)) == ZERO and counts(pushed("unknown", 0)) == ZERO  # (WeCom may show it)
    assert counts(pushed("", 0, rows=[]))["stuck"] == 1  # no status in the client's patience
    assert counts(pushed("sent", 1, rows=[]))["audit_rows"] == 1
    assert counts(pushed("sent", 1, rows=["unknown"]))["audit_rows"] == 1
    stopped = pushed("unknown", 1, rows=[], error=proactive.STOPPED_MID_SEND + ": WeCom may have shown it")
    kill = {"kind": "fault", "t": 1.5, "fault": "replica_kill", "target": "replica 1", "start": 0.9, "end": 1.5}
    assert counts([*stopped, kill]) == ZERO  # its replica died mid-send, with the row it would have written


def test_a_push_said_stopped_mid_send_while_no_sender_stopped_owes_its_audit_row():
    """Seed 63: a push went out, Redis lost what followed the send, and the push's record read "the process sending
    it stopped" with no audit row, though every replica lived. Only a fault that can stop a sender, while the push
    was asked for, excuses its row; another fault, or one before, does not."""
    stopped = pushed("unknown", 1, rows=[], error=proactive.STOPPED_MID_SEND + ": WeCom may have shown it")
    redis = {"kind": "fault", "t": 1.5, "fault": "redis_replies_lost", "target": "redis", "start": 0.5, "end": 1.5}
    kill_before = {"kind": "fault", "t": 0.5, "fault": "replica_kill", "target": "replica 1", "start": 0.4, "end": 0.5}
    assert counts([*stopped, redis])["audit_rows"] == 1
    assert counts([*stopped, kill_before])["audit_rows"] == 1


def ticked(shown: int, rows: list[str], still_open: bool = False) -> list[dict]:
    """The tick at TICK due, taken by its robot `shown` times, with audit rows of these outcomes."""
    events = [{"kind": "tick_due", "t": 1.0, "tick": TICK}]
    content = "您问的是:tick-time 2026-11-27 01:00 asked"
    events += [{"kind": "robot_message", "t": 2.0, "robot": TICK_KEY, "content": content}] * shown
    events += [
        {"kind": "audit_row", "t": 3.0, "msgid": f"schedule:minutely:{TICK}", "row": "schedule", "outcome": o}
        for o in rows
    ]
    events += [{"kind": "tick_open", "t": 4.0, "member": f"minutely:{TICK}"}] if still_open else []
    return [*events, ANOTHER_ROW]


def test_each_tick_due_is_pushed_once_or_said_why_not():
    assert counts(ticked(1, ["pushed"])) == ZERO
    assert check(ticked(1, ["pushed"]))["proactive"]["ticks"] == {"pushed": 1}
    assert counts(ticked(2, ["pushed"]))["duplicate_deliveries"] == 1
    assert counts(ticked(0, ["pushed"]))["lost"] == 1
    assert counts(ticked(0, []))["lost"] == 1  # neither pushed nor said why
    assert counts(ticked(0, ["skipped"])) == ZERO and counts(ticked(0, ["failed"])) == ZERO
    assert counts(ticked(1, ["failed"]))["unexpected"] == 1
    assert counts(ticked(0, [], still_open=True))["stuck"] == 1
    assert counts(ticked(1, ["pushed", "pushed"]))["audit_rows"] == 1
    assert counts(ticked(1, []))["audit_rows"] == 1


def test_two_tries_of_a_tick_begun_at_once_are_an_extra_call():
    """A try is taken over only once its lease lapsed, and asked again 20 s after it failed: two tries of one tick
    whose first log lines (any replica's) are less than a second apart ran at once (three processes once took one
    try over together, and the third failed the tick)."""

    def tried(*firsts: float) -> list[dict]:
        worked = [
            {"kind": "worked", "t": 9.0, "msgid": f"schedule:minutely:{TICK}#{n}", "replica": n % 3, "first": at}
            for n, at in enumerate(firsts, start=1)
        ]
        return [*ticked(0, ["failed"]), *worked]

    assert counts(tried(TICK + 0.01, TICK + 6.01)) == ZERO  # a try taken over once its lease lapsed
    assert counts(tried(TICK + 0.01, TICK + 6.01, TICK + 6.02))["extra_dify_calls"] == 1


def test_a_fault_of_wecoms_http_apis_explains_no_users_note():
    """The pushes' and ticks' link is on no user message's path: a note under such a fault alone is unexplained."""
    note = CLEAR_NOTES["dify_unavailable"]
    events = [*history([(2.0, note, True)]), fault("wecom_api_partition", 0.5, 1.5)]
    assert counts(events)["unexplained_notes"] == 1
