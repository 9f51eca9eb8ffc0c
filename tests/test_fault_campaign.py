"""The fault campaign (bench/faults, FAULTS.md): its checker on histories made by hand (pure logic: each count is
found, and only when it should be), and a 60-second run of the campaign itself, whose counts must all be zero."""

import json

import pytest

from bench.faults import __main__ as campaign
from bench.faults.answers import answer_text
from bench.faults.checker import CLEAR_NOTES, COUNTS, check
from services.texts import CATALOGUE

TAG, OTHER = "a1b2c3", "d4e5f6"
WHOLE = answer_text(TAG, 4)


def history(frames: list[tuple[float, str, bool]], posts: list[str] = (), calls: list[float] = (0.1,)) -> list:
    """One message sent at t=0 whose bubble showed `frames` (time, content, finish), with `posts` through its
    response_url and Dify calls at `calls`."""
    events = [{"kind": "message", "t": 0.0, "msgid": "m1", "tag": TAG, "sentences": 4, "response_url": "u"}]
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


def test_an_answer_shown_whole_counts_nothing():
    assert counts(history([(1.0, WHOLE[:20], False), (2.0, WHOLE, True)])) == ZERO


def test_the_bubble_and_the_rest_through_response_url_count_nothing():
    rest = f"**（接上条回答）**\n\n{answer_text(TAG, 4)[len(answer_text(TAG, 2)) :]}"
    assert counts(history([(2.0, answer_text(TAG, 2) + "\n\n（回答较长…）", True)], posts=[rest])) == ZERO


def test_a_clear_failure_note_is_not_lost():
    note = CATALOGUE["zh"]["stream_cut"]
    assert counts(history([(2.0, f"{answer_text(TAG, 2)}\n\n{note}", True)])) == ZERO
    assert "stream_cut" in CLEAR_NOTES


def test_a_partial_answer_without_a_note_is_lost():
    assert counts(history([(2.0, answer_text(TAG, 2), True)]))["lost"] == 1


def test_the_words_of_a_card_or_a_file_line_are_no_failure_note():
    for words in ("提交", "已过期", "📎 report.pdf", "你好"):  # card texts, a file's line: they end nothing
        assert counts(history([(2.0, f"{answer_text(TAG, 2)}\n\n{words}", True)]))["lost"] == 1


def test_a_bubble_that_never_finished_is_stuck():
    result = counts(history([(1.0, answer_text(TAG, 2), False)]))
    assert result["stuck"] == 1 and result["lost"] == 1


def test_the_answer_in_the_bubble_and_again_through_response_url_is_a_duplicate():
    orphaned = f"{answer_text(TAG, 2)}\n\n{CATALOGUE['zh']['orphaned']}"
    assert counts(history([(2.0, orphaned, True)], posts=[f"**（完整回答）**\n\n{WHOLE}"]))["duplicate_deliveries"] == 1


def test_a_sentence_twice_in_one_bubble_is_a_duplicate():
    twice = answer_text(TAG, 2) + WHOLE
    assert counts(history([(1.0, twice, False), (2.0, WHOLE, True)]))["duplicate_deliveries"] == 1


def test_text_of_another_message_is_unexpected():
    assert counts(history([(2.0, WHOLE + answer_text(OTHER, 1), True)]))["unexpected"] == 1


def test_a_second_dify_call_is_extra_unless_it_restarted_an_answer_that_had_shown_nothing():
    shown_then_called = history([(1.0, answer_text(TAG, 1), False), (3.0, WHOLE, True)], calls=[0.1, 2.0])
    assert counts(shown_then_called)["extra_dify_calls"] == 1
    restarted = history([(1.0, "正在思考…", False), (3.0, WHOLE, True)], calls=[0.1, 2.0])
    assert counts(restarted)["extra_dify_calls"] == 0
    assert counts(history([(3.0, WHOLE, True)], calls=[0.1, 2.0, 2.5]))["extra_dify_calls"] == 1


def test_a_form_dify_took_twice_is_counted():
    events = history([(3.0, WHOLE, True)])
    taken = [{"kind": "form_submission", "t": 1.0, "tag": TAG, "status": status} for status in (200, 412, 200)]
    assert counts(events + taken[:2])["extra_form_submissions"] == 0  # a refused second try took nothing
    assert counts(events + taken)["extra_form_submissions"] == 1


def test_counts_are_broken_down_by_the_faults_active_during_the_message():
    events = history([(2.0, answer_text(TAG, 2), True)])
    events.append({"kind": "fault", "t": 1.5, "fault": "replica_kill", "start": 1.0, "end": 1.5})
    result = check(events)
    assert result["by_fault"]["replica_kill"]["lost"] == 1
    assert result["problems"][0]["faults"] == ["replica_kill"]


@pytest.mark.e2e
def test_a_minute_of_the_campaign_loses_nothing_and_doubles_nothing(tmp_path):
    """Users on three replicas while the nemesis kills, stops and restarts them and pauses Redis (one server)."""
    out = tmp_path / "result.json"
    argv = ["--minutes", "1", "--topology", "standalone", "--users", "4", "--window", "60"]
    result = campaign.main([*argv, "--seed", "7", "--out", str(tmp_path / "run"), "--json", str(out)])
    standalone = result["standalone"]
    assert standalone["messages"] >= 8 and standalone["faults"] >= 3
    assert {name: standalone[name] for name in ZERO} == ZERO, json.dumps(standalone["problems"], indent=1)
    assert json.loads(out.read_text())["standalone"]["messages"] == standalone["messages"]
