"""The demo's chat in a terminal (`make demo`, `python -m demo.wecom_simulator`): questions read from the terminal,
each answer printed as its bubble grows, a card's buttons tapped by number, `/stop` or Ctrl-C to end an answer.

The terminal's lines are read on a thread of their own, so a `/stop` typed while an answer streams is sent at once
(as Ctrl-C is, and as a user sends it in WeCom); any other line typed meanwhile waits its turn as the next question.
"""

from __future__ import annotations

import queue
import signal
import sys
import threading
from typing import TextIO

import httpx

from demo.wecom_simulator import Conversation, ReplyError, WeComSimulator

STOP_COMMANDS = ("/stop", "/停止", "/cancel")
QUIT_COMMANDS = ("/quit", "/exit")


class TerminalInput:
    """The terminal's lines, in order; a stop command typed while an answer streams is taken aside at once."""

    def __init__(self, lines: TextIO | None = None):
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.streaming = threading.Event()  # an answer is being followed
        self.stop_typed = threading.Event()  # and its user typed /stop meanwhile
        reader = threading.Thread(target=self._read, args=(lines or sys.stdin,), name="terminal", daemon=True)
        reader.start()

    def _read(self, lines: TextIO) -> None:
        for raw in lines:
            line = raw.strip()
            if line in STOP_COMMANDS and self.streaming.is_set():
                self.stop_typed.set()
            else:
                self._lines.put(line)
        self._lines.put(None)  # the end of the input (Ctrl-D)

    def line(self, prompt: str) -> str:
        """The next line, after `prompt`.

        Raises:
            EOFError: the input ended.
        """
        print(prompt, end="", flush=True)
        line = self._lines.get()
        if line is None:
            self._lines.put(None)  # every later ask ends too
            raise EOFError
        return line


class _GrowingPrinter:
    """Prints each frame's new suffix while the bubble grows, or the whole text when it was replaced."""

    def __init__(self) -> None:
        self.shown = ""

    def __call__(self, frame: dict) -> None:
        content = frame["stream"].get("content", "")
        if content.startswith(self.shown):
            print(content[len(self.shown) :], end="", flush=True)
        else:
            print("\n" + content, end="", flush=True)
        self.shown = content


class _CardTapper:
    """Shows a card that rides on the bubble and taps the button the user picks by its number (in WeCom the user
    would tap it while the bubble waits). Anything but a button's number is asked again: nothing is chosen for the
    user; a stop command ends the answer instead."""

    def __init__(self, simulator: WeComSimulator, terminal: TerminalInput, userid: str, chatid: str):
        self.simulator, self.terminal, self.userid, self.chatid = simulator, terminal, userid, chatid

    def __call__(self, frame: dict) -> None:
        card = frame.get("template_card")
        if not card:
            return
        title = (card.get("main_title") or {}).get("title", "")
        print(f"\n[card] {title}\n{card.get('sub_title_text', '')}")
        buttons = card.get("button_list") or []
        for number, button in enumerate(buttons, 1):
            print(f"  {number}. {button['text']}")
        for jump in card.get("jump_list") or []:
            print(f"  - {jump['title']}")
        if buttons and (number := self._chosen(len(buttons))):
            action = buttons[number - 1]["key"].rpartition("#")[2]
            reply = self.simulator.send(self.simulator.card_click(card, action, self.userid, self.chatid))
            status = ((reply or {}).get("template_card") or {}).get("main_title", {}).get("desc", "")
            print(f"[card updated: {status}]\nbot> ", end="", flush=True)

    def _chosen(self, count: int) -> int:
        """The number of the button the user tapped; 0 when they stopped the answer, or the input ended."""
        self.terminal.streaming.clear()  # a /stop here is this prompt's answer
        try:
            while True:
                choice = self.terminal.line(f"tap> (1-{count}, or /stop) ")
                if choice.isdigit() and 1 <= int(choice) <= count:
                    return int(choice)
                if choice in STOP_COMMANDS:
                    self.terminal.stop_typed.set()
                    return 0
                print(f"[no button {choice!r}: type a button's number, 1 to {count}]")
        except EOFError:
            return 0
        finally:
            self.terminal.streaming.set()


def _print_separate_message(body: dict) -> None:
    content = (body.get("markdown") or {}).get("content", "")
    print(f"\n[separate message through response_url]\n{content}\n", flush=True)


def chat_loop(simulator: WeComSimulator, userid: str, chatid: str = "", lines: TextIO | None = None) -> None:
    """Read questions from the terminal (or `lines`) and print each answer as it grows. `/stop` or Ctrl-C while an
    answer streams stops it (it sends `/stop`, as the user would in WeCom); Ctrl-D, `/quit` or Ctrl-C at the prompt
    ends the chat."""
    where = f" in group {chatid}" if chatid else ""
    print(f"Chatting as '{userid}'{where}. /stop or Ctrl-C stops an answer; Ctrl-D or /quit ends the chat.")
    simulator.inbox.on_message = _print_separate_message
    terminal = TerminalInput(lines)
    while True:
        try:
            question = terminal.line("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if question in QUIT_COMMANDS:
            return
        if not question:
            continue
        print("bot> ", end="", flush=True)
        try:
            conversation = _answer(simulator, terminal, question, userid, chatid)
        except (ReplyError, httpx.HTTPError) as exc:
            print(f"\n[error: {exc}]")
            continue
        except KeyboardInterrupt:
            print("\n[stopped following the answer]")
            continue
        images = len(conversation.last.get("msg_item") or [])
        if images:  # the bubble shows them under its text; a terminal cannot
            print(f"\n[{images} image{'s' if images > 1 else ''} in the bubble: see them in the console, /console]")
        state = "finished" if conversation.finished else "still running when WeCom stopped polling"
        print(f"\n[{state} after {conversation.polls} polls]")


def _answer(
    simulator: WeComSimulator, terminal: TerminalInput, question: str, userid: str, chatid: str
) -> Conversation:
    """Ask, and follow the bubble to its end; a `/stop` typed or a Ctrl-C meanwhile sends `/stop` and follows the
    bubble to the note that says so (a second Ctrl-C stops following it).

    While the first bubble is followed, Ctrl-C only sets a flag, looked at with each frame: a KeyboardInterrupt
    raised wherever the signal lands may land in a finalizer the garbage collector runs, which swallows it."""
    printer, tapper = _GrowingPrinter(), _CardTapper(simulator, terminal, userid, chatid)
    pressed = terminal.stop_typed
    pressed.clear()

    def on_frame(frame: dict) -> None:
        printer(frame)
        tapper(frame)
        if pressed.is_set():
            raise KeyboardInterrupt

    first = simulator.send(simulator.text_message(question, userid, chatid))
    if first is None:
        raise ReplyError("empty reply to a text message")
    ctrl_c = _CtrlC(pressed)
    terminal.streaming.set()
    try:
        return simulator.follow(first, userid, chatid, on_frame=on_frame)
    except KeyboardInterrupt:
        ctrl_c.restore()
        stopped = simulator.send(simulator.text_message("/stop", userid, chatid)) or {}
        print(f"\n[/stop: {(stopped.get('stream') or {}).get('content', '')}]")
        pressed.clear()
        return simulator.follow(first, userid, chatid, on_frame=printer)
    finally:
        terminal.streaming.clear()
        ctrl_c.restore()


class _CtrlC:
    """While it is in place, Ctrl-C sets `pressed` instead of raising (only a program's main thread can catch it:
    elsewhere, a chat of its own thread, it changes nothing)."""

    def __init__(self, pressed: threading.Event):
        self._default = None
        if threading.current_thread() is threading.main_thread():
            self._default = signal.signal(signal.SIGINT, lambda *_: pressed.set())

    def restore(self) -> None:
        if self._default is not None:
            signal.signal(signal.SIGINT, self._default)
            self._default = None
