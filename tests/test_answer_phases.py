"""An answer's phase changes only through its named transitions (services/streams/answer.py), and a Dify run's
text gate (services/backends/dify/run.py) leaves a resumed run's repeat out and holds text after a hole until it can
be placed. Pure logic: no Redis."""

from dataclasses import fields

import pytest

from services.backends.dify.run import TextGate
from services.streams.answer import Answer, Phase


def test_a_chat_streams_then_ends_at_message_end():
    answer = Answer()
    assert answer.phase is Phase.STREAMING and not answer.paused and not answer.ended
    answer.message_ended()
    assert answer.phase is Phase.ENDED and answer.ended and not answer.paused


def test_a_run_ends_at_workflow_finished_not_at_message_end():
    answer = Answer(workflow_run_id="run-1")
    answer.message_ended()
    assert answer.phase is Phase.STREAMING
    answer.run_ended()
    assert answer.phase is Phase.ENDED


def test_a_form_is_asked_then_the_run_pauses_then_goes_on_after_the_answer():
    answer = Answer(workflow_run_id="run-1")
    answer.form_asked()
    assert answer.phase is Phase.FORM_ASKED and answer.paused and not answer.ended  # events go on to the pause
    answer.run_paused()
    assert answer.phase is Phase.PAUSED and answer.paused and answer.ended
    answer.goes_on_after_form()
    assert answer.phase is Phase.STREAMING
    answer.run_ended()
    assert answer.phase is Phase.ENDED


def test_a_form_asked_again_after_the_events_ended_stays_paused():
    """A refused or expired submission asks again: the run still waits, its events are still over."""
    answer = Answer(workflow_run_id="run-1")
    answer.run_paused()
    answer.form_asked()
    assert answer.phase is Phase.PAUSED


@pytest.mark.parametrize("name", ["paused", "ended"])
def test_the_phase_is_the_only_state_of_the_call(name):
    """`paused` and `ended` are read from the phase, never stored beside it."""
    assert name not in {f.name for f in fields(Answer)}
    with pytest.raises(AttributeError):
        setattr(Answer(), name, True)


def test_the_gate_leaves_the_repeat_out_compared_by_text():
    gate = TextGate()
    gate.expect_echo("Hello world")
    assert not gate.open
    assert gate.admit("Hello ") == ""
    assert gate.admit("world") == ""
    assert gate.admit(", and more") == ", and more"  # the repeat is over: new text
    assert gate.open


def test_the_gate_takes_text_that_differs_from_the_repeat_as_new():
    gate = TextGate()
    gate.expect_echo("Hello world")
    assert gate.admit("Hello there") == "Hello there"
    gate.expect_echo("Hello")
    assert gate.admit("Hello, again") == ", again"  # past the repeat, the rest


def test_the_gate_holds_text_after_a_hole_until_released():
    gate = TextGate()
    gate.hold()
    assert gate.admit("after ") == "" and gate.admit("a hole") == ""
    assert gate.release() == "after a hole"
    assert gate.open and gate.admit("next") == "next"


def test_a_run_starting_again_after_a_form_ends_the_holding():
    gate = TextGate()
    gate.hold()
    gate.admit("lost")
    gate.expect_echo("known")
    assert not gate.holding and gate.held == ""
    assert gate.admit("known") == "" and gate.admit(" rest") == " rest"
