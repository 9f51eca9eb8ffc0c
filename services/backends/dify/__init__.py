"""A Dify app as a bot's backend (answering.py), with its events recorded into the answer (recorder.py, relay.py),
the forms its runs pause at (form_steps.py), and what it adds once the answer ended (completion.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.backends.dify.answering import DifyBackend, DifyParts
from services.backends.dify.recorder import AnswerOptions

if TYPE_CHECKING:
    from services.backends.parts import BackendParts

__all__ = ["DifyBackend", "DifyParts", "build"]


def build(parts: BackendParts) -> DifyBackend:
    """The bot's Dify app as its backend, with the options its settings give (SHOW_REASONING, SHOW_CITATIONS,
    DIFY_WORKFLOW_INPUT, DIFY_WORKFLOW_OUTPUT)."""
    dify = parts.settings.dify
    options = AnswerOptions(
        show_reasoning=dify.show_reasoning,
        show_citations=dify.show_citations,
        workflow_input=dify.workflow_input,
        workflow_output=dify.workflow_output,
    )
    return DifyBackend(parts.dify, options, parts.settings.name, parts.finisher, parts.texts, parts.health)
