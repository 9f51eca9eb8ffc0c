"""Which reads the worker's relay handles in the read pump's thread, and which wake the worker (pure logic)."""

import threading
import time

import pytest

from services.backends.dify.relay import TextRelay
from services.backends.dify.run import DifyRun
from services.dify.events import DifyEvent
from services.streams.answer import Answer
from services.streams.store import CLOSED, TAKEN, WRITTEN

IDS = {"task_id": "t1", "message_id": "m1", "conversation_id": "c1"}


class RecordingWriter:
    def __init__(self):
        self.state = WRITTEN
        self.error = None
        self.added = []

    def add(self, deltas, fields=None):
        self.added.append((list(deltas), fields))


def message(answer, **ids):
    return DifyEvent("message", {"event": "message", "answer": answer, **IDS, **ids})


@pytest.fixture
def relay():
    answer = Answer(
        task_id="t1", message_id="m1", conversation_id="c1", writer=RecordingWriter(), text="Hi", answered=True
    )
    return TextRelay(answer, DifyRun(), threading.Event(), time.monotonic() + 60)


def test_plain_deltas_go_straight_to_the_writer(relay):
    assert relay([message(" there"), message(""), message("!")])
    assert relay([])  # a read with nothing to pass on (a ping)
    assert relay.answer.text == "Hi there!"
    assert relay.answer.writer.added == [([" there", "!"], None)]


@pytest.mark.parametrize(
    "batch",
    [
        [message("a"), DifyEvent("message_end", {"event": "message_end", **IDS})],
        [DifyEvent("message_replace", {"event": "message_replace", "answer": "x", **IDS})],
        [DifyEvent("agent_thought", {"event": "agent_thought", "thought": "hm", **IDS})],
        [message("a", conversation_id="c2")],
        [message("a", task_id="t2")],
    ],
    ids=["end", "replace", "thought", "new conversation id", "new task id"],
)
def test_anything_but_plain_deltas_wakes_the_worker_and_changes_nothing(relay, batch):
    assert not relay(batch)
    assert relay.answer.text == "Hi"
    assert relay.answer.writer.added == []


def test_the_first_delta_wakes_the_worker(relay):
    relay.answer.text, relay.answer.answered = "", False
    assert not relay([message("a")])


@pytest.mark.parametrize("news", ["taken", "closed", "redis error", "cancelled", "deadline", "detached"])
def test_news_for_the_worker_wakes_it(relay, news):
    answer = relay.answer
    if news == "taken":
        answer.writer.state = TAKEN
    elif news == "closed":
        answer.writer.state = CLOSED
    elif news == "redis error":
        answer.writer.error = ConnectionError("redis down")
    elif news == "cancelled":
        relay.cancelled.set()
    elif news == "deadline":
        relay.deadline = time.monotonic() - 1
    else:
        answer.detached = True
    assert not relay([message("a")])
    assert not relay([])
    assert answer.writer.added == []


def test_a_workflows_text_chunks_are_relayed(relay):
    chunk = DifyEvent("text_chunk", {"event": "text_chunk", "data": {"text": " more"}, **IDS})
    assert relay([chunk])
    assert relay.answer.text == "Hi more"


def test_after_agent_messages_a_message_wakes_the_worker(relay):
    """The newer agent app's closing `message` repeats the whole answer: the recorder decides what it is."""
    relay.run.agent_messages = True
    assert not relay([message("Hi")])
    assert relay.answer.text == "Hi"


def test_an_open_think_block_wakes_the_worker(relay):
    relay.answer.thinking = True
    assert not relay([message(" answer")])
