"""The port through which the stream core asks a bot's backend for an answer (docs/architecture.md, "Backends").

A backend (services/backends: Dify, an OpenAI-compatible server) makes one answer into the `Answer` the core gives
it, through the turn's `Turn` (services/streams/turn.py): its text and reasoning go to the answer's writer, its
status line to its progress, its ids, files and usage onto the answer; it ends the answer through the finisher or
raises. It says what it can do (`Capabilities`), and the core never asks it for more: an answer whose replica died
is followed again only by a backend that `resumes`, and only a backend with `forms` pauses for a person. The core
owns the rest: who may ask, the bot's cap on answers at once, the leases and fences that make an answer happen once
across replicas, the final state, and the note a failure ends with.

A backend's methods raise BackendError (services/transport/errors.py) for a call that failed, AuthError (from the
turn's authorization), Declined (services/media: a question it cannot take), or StreamAborted (the answer is no
longer this attempt's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from services.streams.turn import Turn


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do beyond streaming an answer."""

    resumes: bool = False  # an answer whose replica died is followed again from where its run is (a Dify run)
    forms: bool = False  # an answer may wait for a person's form, shown as a card (Dify's Human Input)


class Backend(Protocol):
    """One bot's backend (services/backends/__init__.py has the registry of kinds)."""

    name: str  # its kind ("dify", "openai"): the `backend` of logs, metrics and audit rows
    capabilities: Capabilities

    def answer(self, turn: Turn) -> None:
        """Answer a new question, to its final state."""

    def resume(self, turn: Turn) -> None:
        """Follow again the run of an answer whose replica is gone (`capabilities.resumes`), to its final state."""

    def continue_form(self, turn: Turn) -> None:
        """The rest of a run after a form's answer, as a message of its own (`capabilities.forms`)."""

    def stop(self, task_id: str, user: str) -> None:
        """Ask the backend to stop the task of an answer its user stopped (best effort; never raises)."""

    def check(self, timeout: float = 5.0) -> str:
        """Whether the backend answers with the bot's settings: "" when it does, else one line saying why not, in
        the words of the setting to fix (never a key): `flask bots check`, the demo's start-up lines."""

    def where(self) -> str:
        """Where it is, for an operator (its host; a model's name)."""
