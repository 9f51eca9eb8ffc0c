"""Chatflow and workflow runs as a real Dify 1.14.2 and 1.16.0 run them, played by the faithful stand-in with the
captured apps (demo/dify_flows.py), through two gateway replicas on the test Redis (callback mode; gunicorn replicas
that are killed, and long-connection mode: tests/e2e/test_dify_runs_e2e.py). Every case also reads the stand-in's
records: one chat call per message, and one form submission per answered form."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from demo import dify_apps as apps
from demo import dify_flows as flows
from demo import dify_runs
from demo import dify_standin as d
from demo.dify_versions import standin_version
from services.texts import CATALOGUE
from tests.conftest import make_simulator, wait_until
from tests.test_dify_apps import follow_growing
from tests.test_forms import ask_and_click

ZH = CATALOGUE["zh"]
VERSIONS = pytest.mark.parametrize("version", ["1.14", "1.16"], ids=["dify-1.14.2", "dify-1.16.0"])


def play(dify, version: str) -> None:
    """The stand-in plays this Dify version for the test (reset() takes it back)."""
    dify.version = standin_version(version)


def only_grows(contents: list[str]) -> bool:
    """The bubble's text only ever grew (nothing withdrawn, nothing shown twice)."""
    shown = [c for c in contents if c != ZH["placeholder"]]
    return all(later.startswith(earlier.split("\n\n")[0]) for earlier, later in zip(shown, shown[1:], strict=False))


@pytest.mark.parametrize(
    ("version", "answer_bug"),
    [("1.14", True), ("1.14", False), ("1.16", False)],
    ids=["dify-1.14.2", "dify-1.14.2-bug-fixed", "dify-1.16.0"],
)
def test_the_rest_after_an_answer_before_the_pause_reaches_the_bubble_once(sims, dify, version, answer_bug):
    """hitl-chatflow: Dify #38432 (1.14.2) streams nothing after the form (the rest is only in the outputs), and the
    resumption repeats the answer before the pause (1.14.2; 1.16.0 repeats nothing and streams the rest); the bubble
    shows each part once. The text input has a default: it is submitted as Dify gives it, and the user is not asked
    to type it."""
    play(dify, version)
    dify.serve_flow(flows.hitl_chatflow())
    dify.answer_bug = answer_bug
    conversation, reply, _ = ask_and_click(sims[0], sims[1], "buy laptops")
    assert reply["template_card"]["main_title"]["desc"] == ZH["form_submitted"].format(choice="Approve")
    assert conversation.text == "You said: buy laptops. Waiting for approval...APPROVED. comment=looks good"
    assert only_grows(conversation.contents())
    prompts = [c for c in conversation.contents() if "Please review the request" in c]
    assert prompts and all("buy laptops" in c and "{{#" not in c for c in prompts)  # rendered, never the template
    [submission] = dify.form_submissions
    assert (submission["status"], submission["body"]["inputs"]) == (200, {"comment": "looks good"})
    assert len(dify.chat_requests()) == 1
    # The run's events were subscribed before the submission: nothing of the resumption could be missed.
    [follow] = dify.reattaches
    assert follow["continue_on_pause"] and not follow["include_state_snapshot"]
    assert follow["at"] < submission["at"]


@VERSIONS
def test_the_rest_streamed_after_a_form_with_nothing_before_it(sims, dify, version):
    """hitl-chatflow-b: nothing answered before the pause; the rest streams after the form's answer."""
    play(dify, version)
    dify.serve_flow(flows.hitl_chatflow_b())
    conversation, _, _ = ask_and_click(sims[0], sims[1], "variant b", action="reject")
    assert conversation.text == "AFTER-RESUME action=reject comment=looks good"
    assert [s["body"]["action"] for s in dify.form_submissions] == ["reject"]


@VERSIONS
def test_a_workflow_apps_form(sims, dify, version):
    """hitl-workflow: the End's outputs, streamed as text chunks after the form. Dify 1.16.0 then ends the run
    `stopped` with no outputs (a regression; its record keeps them): the answer is whole all the same, with no note
    of a failure or of a stop the user never made."""
    play(dify, version)
    dify.serve_flow(flows.hitl_workflow())
    conversation, _, _ = ask_and_click(sims[0], sims[1], "rotate keys")
    assert conversation.text == "approve\nlooks good"
    assert dify.chat_requests()[0]["inputs"] == {"query": "rotate keys"}  # the bot's configured input


def test_a_workflow_run_ended_stopped_takes_its_outputs_once_its_record_has_them(sims, dify, monkeypatch):
    """Dify 1.16.0 ends a resumed workflow app `stopped` with no outputs and writes them to its record a moment
    later: a listener that heard that end asks the record again for a few seconds, and the answer is whole, with no
    note of a stop (a single read showed the stop note)."""
    play(dify, "1.16")
    monkeypatch.setattr(dify_runs, "NEW_LISTENER_LAG", -60.0)  # the listener hears the run's end this time
    dify.serve_flow(flows.hitl_workflow())
    conversation, _, _ = ask_and_click(sims[0], sims[1], "rotate keys")
    assert conversation.text == "approve\nlooks good"
    assert len(dify.record_reads) >= 2  # the first read came before the record had the outputs


def test_a_text_field_without_a_default_is_typed_in_the_next_message(sims, dify):
    dify.serve_flow(flows.typed_chatflow())
    notes = []

    def on_frame(frame):
        if "template_card" in frame and not notes:
            notes.append(sims[1].send(sims[1].text_message("new hires"))["stream"]["content"])

    conversation = sims[0].ask("buy laptops", on_frame=on_frame)
    assert ZH["form_submitted"].format(choice="Send") in notes[0]
    [submission] = dify.form_submissions
    assert submission["body"]["inputs"] == {"reason": "new hires"}
    assert conversation.text == "You said: buy laptops. Waiting for approval... reason=new hires"
    assert len(dify.chat_requests()) == 1  # the typed value was never a question for Dify


def test_a_form_nobody_answers_follows_difys_timeout_branch(sims, dify):
    dify.serve_flow(flows.expiring_chatflow(expires_in=1.5))
    conversation = sims[0].ask("buy laptops")
    assert conversation.text == (
        "You said: buy laptops. Waiting for approval... Nobody answered in time.\n\n" + ZH["form_timed_out"]
    )
    assert dify.form_submissions == []


def asked_of_a_draining_owner(pair, lose_card: bool = False):
    """'buy laptops' asked of the first replica of `pair`, which drains as soon as its form opens (the wait handed
    over at once; with `lose_card`, the card's write lost too): a simulator of the other replica, and the reply."""
    owner, other = pair
    forms = next(iter(owner.gateway.bots.values())).streams.worker.backends[""].parts.forms
    opened = forms.open

    def open_then_drain(*args, **kwargs):
        ticket = opened(*args, **kwargs)
        assert ticket is not None and ticket.card is not None
        owner.gateway.runner.accepting = False  # the process drains: the form's wait is handed over at once
        return replace(ticket, card=None) if lose_card else ticket

    forms.open = open_then_drain
    to_owner, to_other = make_simulator(owner.url), make_simulator(other.url)
    return to_other, to_owner.send(to_owner.text_message("buy laptops"))


def first_card(sim, stream_id: str) -> dict:
    """Poll the stream through `sim` until a reply carries a card; that card."""
    cards = []

    def card_came() -> bool:
        reply = sim.send(sim.poll_message(stream_id))
        cards.extend([reply["template_card"]] if "template_card" in reply else [])
        return bool(cards)

    assert wait_until(card_came, timeout=20)
    return cards[0]


def test_a_form_wait_handed_over_is_resumed_though_its_run_id_was_still_in_the_writer(pair, dify):
    """A process that drains hands a form's wait over by releasing the stream's lease; the next poll elsewhere resumes
    the run, if the stream's record has the run's id. The id rides the answer's writer, which sends without making
    the worker wait: released first, a poll met a stream with no run id and restarted it, a second Dify call (a
    fresh-clone CI met it). Here the owner's appends go 3 s late (a loaded machine), so the id is still on its way."""
    dify.serve_flow(flows.hitl_chatflow())
    batcher = next(iter(pair[0].gateway.bots.values())).streams.worker.deps.appender
    submitting = batcher.submit

    def late(writer) -> None:
        timer = threading.Timer(3.0, submitting, [writer])
        timer.daemon = True
        timer.start()

    batcher.submit = late
    to_other, first = asked_of_a_draining_owner(pair)

    def resumed() -> bool:
        to_other.send(to_other.poll_message(first["stream"]["id"]))
        return any(r["include_state_snapshot"] for r in dify.reattaches)

    first_card(to_other, first["stream"]["id"])
    assert wait_until(resumed, timeout=20)  # the other replica resumed the run ...
    assert len(dify.chat_requests()) == 1  # ... and never asked Dify again


def test_a_card_that_never_reached_the_stream_rides_on_the_replica_that_resumes_it(pair, dify):
    """The replica that opened a form stops before its card reached the stream (the write met Redis away, and the
    process drained; here the card is dropped from the opened form to stand for that lost write). The replica that
    resumes the run meets the form again: the card the form was opened with, never shown, rides on its next poll,
    and a click goes on. (Before, the bubble asked for a tap on a card that never came.)"""
    dify.serve_flow(flows.hitl_chatflow())
    to_other, first = asked_of_a_draining_owner(pair, lose_card=True)
    card = first_card(to_other, first["stream"]["id"])
    assert any(r["include_state_snapshot"] for r in dify.reattaches)  # the other replica resumed the run
    to_other.send(to_other.card_click(card, "approve"))
    conversation = to_other.follow(first)
    assert conversation.text == "You said: buy laptops. Waiting for approval...APPROVED. comment=looks good"
    assert [s["body"]["action"] for s in dify.form_submissions] == ["approve"]


def test_a_paused_run_handed_over_by_a_draining_replica_is_resumed_from_its_snapshot(pair, dify):
    """The waiting worker's replica drains: the other's next poll resumes the run, which Dify only rebuilds with
    include_state_snapshot (a plain re-attach to a paused run only pings); the card came once, and a click goes on
    in the same bubble."""
    dify.serve_flow(flows.hitl_chatflow())
    owner, other = pair
    to_owner, to_other = make_simulator(owner.url), make_simulator(other.url)
    first = to_owner.send(to_owner.text_message("buy laptops"))
    stream_id = first["stream"]["id"]
    card = None
    while card is None:
        card = to_owner.send(to_owner.poll_message(stream_id)).get("template_card")
    owner.gateway.drain(0.01)

    def resumed() -> bool:
        to_other.send(to_other.poll_message(stream_id))  # WeCom polls on; the next poll takes the stream over
        return any(r["include_state_snapshot"] for r in dify.reattaches)

    assert wait_until(resumed, timeout=15)
    to_other.send(to_other.card_click(card, "approve"))
    conversation = to_other.follow(first)
    assert conversation.text == "You said: buy laptops. Waiting for approval...APPROVED. comment=looks good"
    assert conversation.cards == []  # never a second card for the message
    assert len(dify.form_submissions) == 1 and len(dify.chat_requests()) == 1
    to_owner.close()
    to_other.close()


@VERSIONS
def test_a_run_handed_over_mid_run_goes_on_from_what_the_bubble_showed(make_pair, dify, version):
    """slow-chatflow, drained while its HTTP node waits: the other replica attaches (with the snapshot, whose
    message_replace of "" wipes nothing) and shows the second part once. On Dify 1.16.0 that listener gets the
    rest's text and then only pings (the run's first reader went away): the run is checked against Dify's record
    after DIFY_QUIET_RUN_SECONDS of pings, and the bubble ends from it within that of the run's end."""
    play(dify, version)
    dify.serve_flow(flows.slow_chatflow(seconds=3))
    owner, other = make_pair(dify_quiet_run_seconds=2)
    to_owner, to_other = make_simulator(owner.url), make_simulator(other.url)
    first = to_owner.send(to_owner.text_message("mid-run"))
    stream_id = first["stream"]["id"]
    assert wait_until(lambda: "part one" in to_owner.send(to_owner.poll_message(stream_id))["stream"]["content"])
    owner.gateway.drain(0.01)
    assert follow_growing(to_other, first, stream_id) == "part one (mid-run). SLEPT (part two)"
    finished = time.time()
    assert [r["include_state_snapshot"] for r in dify.reattaches] == [True]
    assert len(dify.chat_requests()) == 1
    [run] = dify.runs.values()
    assert finished - run.finished_at < 2 + 2.5  # the quiet time, a second's precision, the polls
    if version == "1.16":  # on 1.14.2 too, while the HTTP node is quiet longer than that (it says: running)
        assert dify.record_reads
    to_owner.close()
    to_other.close()


@VERSIONS
def test_the_rest_after_a_form_begins_as_the_answer_before_it_did(sims, dify, version):
    """Dify 1.14.2 repeats the answer before the pause when a run resumes, and the gateway leaves the repeat out;
    1.16.0 repeats nothing, and text after the form that begins as the earlier answer did is new, all of it."""
    play(dify, version)
    dify.answer_bug = False
    before = flows.Answer("a1", "Request {{#sys.query#}} received. ")
    after = flows.Answer("a2", "Request {{#sys.query#}} approved.")
    then = (after, flows.Wait("wait", 1.0))  # the run's end comes a second after the text: polls see the text
    form = flows.Approval("approval", flows.REVIEW, flows.APPROVE_REJECT, (flows.comment_input(),), then=then)
    dify.serve_flow(flows.Flow("echo-like", "advanced-chat", (before, form)))
    conversation, _, _ = ask_and_click(sims[0], sims[1], "42")
    assert conversation.text == "Request 42 received. Request 42 approved."
    assert only_grows(conversation.contents())  # never a wrong text shown, then replaced at the run's end


@VERSIONS
def test_a_form_followed_after_its_answer_whose_stream_is_cut_is_followed_again(sims, dify, version):
    """The stream following a run from its form's answer ends without its last chunk (Dify 1.16.0 cuts a plain
    listener when another subscriber of the run closes; here a snapshot listener of ours, mid-run): the run is
    followed again from its snapshot, never taken for failed; the rest once, one submission, one chat call."""
    play(dify, version)
    dify.serve_flow(flows.hitl_chatflow(wait_seconds=2))
    cut = []

    def cut_the_listener() -> None:
        assert wait_until(lambda: dify.form_submissions, timeout=20)
        time.sleep(0.5)  # the run waits in its HTTP node
        [run_id] = dify.runs
        cut.append(dify.cut_listeners(run_id))

    helper = threading.Thread(target=cut_the_listener, daemon=True)
    helper.start()
    conversation, _, _ = ask_and_click(sims[0], sims[1], "buy laptops")
    helper.join(5)
    assert cut == [1]  # the gateway's listener, following the run from the form's answer
    assert conversation.text == "You said: buy laptops. Waiting for approval...APPROVED. comment=looks good"
    assert [r["include_state_snapshot"] for r in dify.reattaches] == [False, True]
    assert len(dify.form_submissions) == 1 and len(dify.chat_requests()) == 1


@VERSIONS
def test_a_form_the_service_api_cannot_reach_ends_the_bubble_saying_where_it_waits(sims, dify, version):
    """A run pauses at a form that Dify delivers only through its own channels (its form GET answers 404): the
    bubble ends, saying the request awaits approval elsewhere; nothing is submitted."""
    play(dify, version)
    dify.serve_flow(flows.hitl_select_file(service_api=False))
    conversation = sims[0].ask("ship v4")
    assert conversation.text == ZH["form_elsewhere"]
    assert conversation.cards == [] and dify.form_submissions == []


def test_a_chatflow_conversation_carries_on_on_the_other_replica(sims, dify):
    dify.serve_flow(flows.PLAIN_CHATFLOW)
    assert sims[0].ask("one").text == "hello one"
    assert sims[1].ask("two").text == "hello two"
    first, second = dify.chat_requests()
    assert "conversation_id" not in first and second["conversation_id"]


def test_a_run_that_cannot_be_followed_again_is_never_asked_again(sims, dify):
    """A chatflow's stream is cut mid-run in a conversation, and the re-attach is refused (404): the question is not
    sent again as if Dify had lost the conversation (that 404 is only the question's own); the bubble ends with
    what it showed and a note."""
    dify.mode = "advanced-chat"
    dify.script(apps.chatflow_answer("first answer"))
    assert sims[0].ask("one").text == "first answer"
    dify.script([apps.workflow_started(), d.message("half "), d.sleep(0.2), d.cut()])
    dify.reattach_refusals.extend([404] * 4)
    conversation = sims[1].ask("two")
    assert conversation.finished and conversation.text.startswith("half\n\n")  # what it showed, and a note
    assert len(dify.chat_requests()) == 2  # one per question: never a second for "two"


def test_a_run_dify_refuses_to_follow_again_for_a_moment_is_followed_once_it_takes_it(make_pair, dify):
    """A chatflow's stream is cut mid-run while Dify restarts: its first re-attaches are refused (503). Following a
    run makes nothing, so it is tried again, every 1-5 s (DIFY_RETRY_SECONDS), and the bubble ends with the whole
    answer, not with what it showed and a note; the question itself was asked once."""
    pair = make_pair(dify_retry_seconds=20, dify_max_retries=0)
    sim = make_simulator(pair[0].url)
    dify.mode = "advanced-chat"
    rest = [d.sleep(0.3), d.message("and the rest"), apps.workflow_done({"answer": "half and the rest"}), d.end()]
    dify.script([apps.workflow_started(), d.message("half "), d.sleep(0.2), d.cut(), *rest])
    dify.reattach_refusals.extend([503] * 2)
    assert sim.ask("go on").text == "half and the rest"
    assert len(dify.reattaches) == 3 and len(dify.chat_requests()) == 1
    sim.close()
