"""The demo's chat in a terminal (demo/terminal_chat.py), against a live gateway and the Dify stand-in: a card's
tap answered with anything but a button's number is asked again (nothing is chosen for the user), and a `/stop`
typed while an answer streams is sent at once, not after the answer ended."""

from __future__ import annotations

import os
import threading

import pytest

from demo import dify_standin as d
from demo.terminal_chat import chat_loop
from services.texts import CATALOGUE
from tests.conftest import wait_until
from tests.test_forms import approval

ZH = CATALOGUE["zh"]


class Keyboard:
    """A terminal's input a test types into, line by line, while the chat reads it."""

    def __init__(self):
        read, self._write = os.pipe()
        self.lines = os.fdopen(read, "r", encoding="utf-8")

    def type(self, line: str) -> None:
        os.write(self._write, (line + "\n").encode())

    def close(self) -> None:
        os.close(self._write)


@pytest.fixture
def terminal(simulator, capsys):
    """The chat loop on its own thread, reading a Keyboard; what it printed so far."""
    keyboard = Keyboard()
    simulator.poll_interval = 0.1
    chat = threading.Thread(target=chat_loop, args=(simulator, "alice", "", keyboard.lines), daemon=True)
    chat.start()
    printed: list[str] = []

    def shown() -> str:
        printed.append(capsys.readouterr().out)
        return "".join(printed)

    yield keyboard, shown
    keyboard.close()
    chat.join(10)
    assert not chat.is_alive()


def test_a_tap_that_is_no_buttons_number_is_asked_again(terminal, dify):
    keyboard, shown = terminal
    dify.script(approval())
    keyboard.type("buy laptops")
    assert wait_until(lambda: "tap> " in shown())
    for typo in ("", "x", "9"):
        keyboard.type(typo)
    assert wait_until(lambda: shown().count("tap> ") == 4)  # asked again after each, and nothing submitted
    assert "[no button 'x'" in shown() and dify.form_submissions == []
    keyboard.type("2")
    assert wait_until(lambda: "[finished after" in shown(), timeout=20)
    [submission] = dify.form_submissions
    assert submission["body"]["action"] == "reject"


def test_a_stop_typed_while_an_answer_streams_is_sent_at_once(terminal, dify):
    keyboard, shown = terminal
    dify.script([d.message("part one"), d.sleep(30), d.message(" never"), d.end()])
    keyboard.type("tell me a long story")
    assert wait_until(lambda: "part one" in shown())
    keyboard.type("/stop")
    assert wait_until(lambda: "[finished after" in shown(), timeout=5)  # not after the 30 s answer
    assert f"[/stop: {ZH['stop_done']}]" in shown() and ZH["stopped_note"] in shown()
    assert " never" not in shown()
