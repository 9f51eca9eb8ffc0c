"""What the gateway makes of a real Dify 1.14.2's streams (tests/fixtures/dify-1.14.2), byte for byte as captured:
the captured SSE bytes go through the event reader and the answer recorder, and what the bubble would show is read
from the recorder's writes. Pure logic: the writer and the store are small recording stand-ins; the same paths run
end to end against the faithful stand-in in tests/test_dify_runs.py and tests/e2e/test_dify_runs_e2e.py."""

from __future__ import annotations

import pytest

from services import metrics
from services.backends.dify.recorder import DEFAULT_OPTIONS, AnswerOptions, AnswerRecorder
from services.dify.events import EventReader
from services.streams.answer import Answer
from services.streams.job import StreamJob
from services.streams.store import WRITTEN
from services.transport.sse import SSEParser
from tests.dify_captures import FIXTURES

BEFORE = "You said: deploy v2 to prod. Waiting for approval..."
WHOLE = BEFORE + "APPROVED. comment=ship it"
PART_ONE, SLOW_WHOLE = "part one (mid-run). ", "part one (mid-run). SLEPT (part two)"


class Bubble:
    """The stream's writer and store in one: what the bubble shows is every delta written, after the last time
    the whole text was replaced."""

    def __init__(self, shown: str = ""):
        self.chunks = [shown] if shown else []
        self.state, self.error = WRITTEN, None
        self.fields: dict = {}
        self.replaced = 0
        self.seen = [self.text]  # every text the bubble showed, in order

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def add(self, deltas, fields=None):
        self.chunks += [d for d in deltas if d]
        self.fields |= fields or {}
        if self.text != self.seen[-1]:
            self.seen.append(self.text)

    def flush(self, timeout):
        return None

    def reset(self, written, written_chars):
        return None

    def replace(self, stream_id, attempt, text):
        self.chunks, self.replaced = [text], self.replaced + 1
        return WRITTEN

    @property
    def reads(self):  # the store's reads: this stand-in's own
        return self

    def superseded(self, stream_id, attempt):
        return False


class Conversations:
    def remember(self, *args):
        return None


def recorder_for(shown: str = "", app_type: str = "advanced-chat", reattached: bool = True, resumed: bool = False):
    """A recorder for an answer whose bubble shows `shown`: following a run (`reattached`), and with `resumed`,
    as a replica that took a lost stream over (its live text held until it can be placed)."""
    bubble = Bubble(shown)
    answer = Answer(writer=bubble, text=shown, answered=bool(shown))
    answer.workflow_run_id = "run" if reattached else ""
    answer.resumed = resumed
    options = AnswerOptions(app_type=app_type) if app_type != "chat" else DEFAULT_OPTIONS
    job = StreamJob(stream_id="s", msgid="m", userid="u", attempt="a#1")
    recorder = AnswerRecorder(job, answer, bubble, Conversations(), options=options)
    recorder.run.reattached = reattached
    if resumed:
        recorder.run.gate.hold()
    return recorder, bubble


def play(recorder: AnswerRecorder, capture: str, app_type: str = "workflow", drop: str = "") -> EventReader:
    """Feed a captured stream to the recorder as the gateway reads it (`drop`: leave out the message events whose
    answer is this, as if they had been published before the reader attached)."""
    reader = EventReader(app_type)
    events = SSEParser().feed((FIXTURES / capture).read_bytes())
    if drop:
        events = [e for e in events if f'"answer":"{drop}"' not in e.data]
    for sse in events:
        recorder.apply(reader.read([sse]))
        if reader.stopped:
            break
    return reader


def test_a_chatflow_answer_ends_at_workflow_finished_not_at_message_end():
    recorder, bubble = recorder_for(reattached=False)
    reader = play(recorder, "80-plain-chatflow-chat-messages.sse", app_type="advanced-chat")
    assert reader.ended and recorder.answer.ended
    assert bubble.text == "hello kit test"


def test_the_run_id_is_noted_from_workflow_events_though_messages_carry_none():
    recorder, bubble = recorder_for(reattached=False)
    play(recorder, "01-chat-messages.sse", app_type="advanced-chat")
    assert bubble.fields["workflow_run_id"] == "f52c9d2d-36b3-4136-a663-f5c15fa09ee0"
    assert recorder.answer.paused and bubble.text == BEFORE


@pytest.mark.parametrize("shown", [BEFORE, "You said: deploy"], ids=["all-shown", "owner-died-mid-write"])
def test_a_snapshot_of_a_paused_run_completes_the_bubble_and_brings_its_form(shown):
    """03: the snapshot's one message_replace holds the answer saved at the pause: what it adds is appended, what
    the bubble has stays; the form comes with its raw template (the gateway reads the form's GET for the text)."""
    recorder, bubble = recorder_for(shown, resumed=True)
    play(recorder, "03-events-paused-snapshot.sse")
    assert bubble.text == BEFORE and bubble.replaced == 0
    assert recorder.answer.paused
    assert recorder.run.form_event["form_token"] == "XjJIX1Q2PiL6cHZwph6CmS"


@pytest.mark.parametrize(
    "capture", ["05-events-live-continue.sse", "09-wait-events-live-continue.sse"], ids=["live", "after-a-wait"]
)
@pytest.mark.parametrize("resumed", [False, True], ids=["its-own-worker", "a-resumed-attempt"])
def test_the_rest_after_a_form_comes_from_the_outputs_once_and_the_repeat_is_left_out(capture, resumed):
    """05, 09: the resumption streams the answer before the pause again, and (Dify #38432) never the rest, which
    only workflow_finished's outputs hold; message_end comes first and is not the end. A resumed attempt that
    sees the run start again after the form holds nothing back from there."""
    query = "deploy v2 to prod" if capture.startswith("05") else "bug 1"
    comment = "ship it" if capture.startswith("05") else "c1"
    before = f"You said: {query}. Waiting for approval..."
    recorder, bubble = recorder_for(before, resumed=resumed)
    play(recorder, capture)
    assert bubble.text == f"{before}APPROVED. comment={comment}"
    assert bubble.replaced == 0  # appended, never rewritten


def test_the_rest_streamed_after_the_form_is_shown_once():
    """20: nothing before the pause; the rest streams as message chunks, and the outputs add nothing."""
    recorder, bubble = recorder_for("")
    play(recorder, "20-events-live-continue.sse")
    assert bubble.text == "AFTER-RESUME action=approve comment=ship it"


def test_a_finished_run_re_attached_gives_the_rest_from_its_outputs():
    """05-after-finish: the run ended before the reader came; its workflow_finished alone."""
    recorder, bubble = recorder_for(BEFORE, resumed=True)
    play(recorder, "05-events-after-finish.sse")
    assert bubble.text == WHOLE and recorder.answer.ended


@pytest.mark.parametrize(
    "capture", ["71-slow-events-live-midrun.sse", "72-slow-events-snapshot-midrun.sse"], ids=["live", "snapshot"]
)
def test_a_run_re_attached_mid_run_goes_on_after_the_text_shown(capture):
    """71, 72: only what comes next; the snapshot's message_replace is "" mid-run and wipes nothing. Resumed, the
    text that comes waits until the run's end says it follows on (nothing fell in between)."""
    unknown = metrics.DIFY_UNKNOWN_EVENTS.labels("default", "node_finished")
    counted = unknown._value.get()
    recorder, bubble = recorder_for(PART_ONE, resumed=True)
    play(recorder, capture)
    assert bubble.text == SLOW_WHOLE and bubble.replaced == 0
    assert bubble.seen == [PART_ONE, SLOW_WHOLE]
    assert unknown._value.get() == counted  # a node event that named the run is no unknown event


def test_what_a_late_reader_missed_is_filled_in_from_the_outputs():
    """A replica that took the stream over after part of the rest was published (the 'SLEPT' delta) never shows
    the text that followed the hole: the bubble goes from what it showed to the whole answer of the outputs."""
    recorder, bubble = recorder_for(PART_ONE, resumed=True)
    play(recorder, "71-slow-events-live-midrun.sse", drop="SLEPT")
    assert bubble.seen == [PART_ONE, SLOW_WHOLE] and bubble.replaced == 0


def test_a_reader_that_is_not_resuming_fills_a_hole_from_the_outputs_too():
    """Following a run without holding (the rest after a form, where the run was subscribed first), a missed
    part is still filled in at the end: the outputs, which begin with what the bubble showed, replace the text."""
    recorder, bubble = recorder_for(PART_ONE)
    play(recorder, "71-slow-events-live-midrun.sse", drop="SLEPT")
    assert bubble.text == SLOW_WHOLE


def test_a_workflow_apps_rest_after_its_form_is_its_text_chunks():
    """40: a workflow app's End outputs stream as text chunks joined by newlines; the outputs add nothing."""
    recorder, bubble = recorder_for("", app_type="workflow")
    play(recorder, "40-events-live-continue.sse")
    assert bubble.text == "approve\nship it"


def test_the_first_chat_stream_of_a_paused_run_stops_at_the_pause():
    recorder, bubble = recorder_for(reattached=False)
    reader = play(recorder, "20-chat-messages.sse", app_type="advanced-chat")
    assert reader.ended and recorder.answer.paused and bubble.text == ""
    assert recorder.run.form_event["form_content"] == "Please review the request: variant b"
