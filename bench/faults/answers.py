"""The answers of a campaign: each message gets a tag of its own, and its answer is numbered sentences carrying
that tag, so every piece of text a user was shown can be traced to its message and its place in the answer (text
from another message, a sentence shown twice, a sentence missing)."""

from __future__ import annotations

import re
from collections import Counter

SENTENCE = re.compile(r"〔([0-9a-f]{6})·(\d+)〕")


def sentence(tag: str, number: int) -> str:
    return f"〔{tag}·{number}〕"


def answer_text(tag: str, sentences: int, padding: str = "") -> str:
    """The answer of message `tag`: its sentences in order, each followed by `padding` (which no check reads)."""
    return "".join(sentence(tag, n) + padding for n in range(sentences))


def sentences_in(text: str) -> list[tuple[str, int]]:
    """Every (tag, number) in `text`, in order, repeats included."""
    return [(tag, int(number)) for tag, number in SENTENCE.findall(text or "")]


def repeats(numbers: list[int]) -> list[int]:
    """The numbers that occur more than once."""
    return sorted(number for number, count in Counter(numbers).items() if count > 1)
