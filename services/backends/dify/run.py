"""What one answer's Dify run adds to the answer in memory (services/streams/answer.py): how its text is gated
(a resumed run's repeat, live text after a hole), whether it is followed from a snapshot, its forms' word for the
final note, and how the run itself ended. Held by the answer's recorder (recorder.py); no other backend has it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TextGate:
    """Where the run's answer text goes before the bubble, when it cannot go straight there. A resumed run sends the
    answer before its pause again (`echo`): that repeat is left out, compared by text. A run followed again after
    its replica was lost may send live text after a hole: while `holding`, it waits in `held` until it can be
    placed (the run ends, and its outputs say the whole answer; or it starts again after a form)."""

    echo: str = ""
    holding: bool = False
    held: str = ""

    @property
    def open(self) -> bool:
        """Text goes straight to the bubble (nothing to leave out, nothing held back)."""
        return not self.echo and not self.holding

    def expect_echo(self, known: str) -> None:
        """The run starts again after a form: it repeats `known` first, and everything after that is whole."""
        self.echo, self.holding, self.held = known, False, ""

    def echo_over(self) -> None:
        """What follows is new (a node began, the form's node finished, the answer was reconciled)."""
        self.echo = ""

    def hold(self) -> None:
        """Live text may follow a hole from here: hold it back."""
        self.holding = True

    def drop_held(self) -> None:
        """The held text is not wanted: the run's saved state is read again instead."""
        self.held = ""

    def release(self) -> str:
        """Stop holding; the text held so far, for the caller to place."""
        held, self.holding, self.held = self.held, False, ""
        return held

    def admit(self, text: str) -> str:
        """What of `text` goes to the bubble now ("" when it is the repeat, or held back)."""
        if self.echo:
            text = self._past_echo(text)
        if self.holding:
            self.held += text
            return ""
        return text

    def _past_echo(self, text: str) -> str:
        """While `text` is where the repeat is up to, it is left out; once it differs, the repeat is over."""
        if self.echo.startswith(text):
            self.echo = self.echo[len(text) :]
            return ""
        echo, self.echo = self.echo, ""
        return text[len(echo) :] if text.startswith(echo) else text


@dataclass(slots=True)
class DifyRun:
    """One answer's Dify call, beyond what every backend's answer holds."""

    agent_messages: bool = False  # the answer came as agent_message deltas (so a closing message repeats it)
    form_event: dict | None = None  # the human_input_required data of the pause (its form_token, content...)
    form_note: str = ""  # how the last form ended, for the final note (waits, expired, by e-mail)
    form_timed_out: bool = False  # a form expired unanswered and the run went on with its timeout path
    reattached: bool = False  # the events come from following a run (GET /workflow/{run}/events): reconciled
    earlier: str = ""  # a message of its own after a form: the run's answer before the form, which it leaves out
    gate: TextGate = field(default_factory=TextGate)  # the repeat left out, the text after a hole held back
    last_thought: str = ""  # an agent's last thought (the answer, for setups that stream no agent_message)
    error: str = ""  # why the run failed ("": it did not)
    stopped: bool = False  # Dify stopped the run before it made its outputs: the answer is what it streamed
