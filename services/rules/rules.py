"""A rules file read into its matchers (docs/content-rules.md): plain words and phrases, matched case-insensitively
by an Aho-Corasick automaton (pyahocorasick: thousands of words in one pass over the text), and `re:` patterns
(the `regex` module, whose partial matches say whether text at an answer's end could still become a match)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import ahocorasick
import regex

PATTERN_PREFIX = "re:"
# What a masked character becomes: the fullwidth asterisk, which markdown (WeCom's, the console's, CommonMark) never
# reads as emphasis, where runs of `*` would turn the text around them bold or italic. One per character masked.
MASK = "\uff0a"


class RulesError(ValueError):
    """A rules file that cannot be used: one line naming the file, the line and the problem."""


@dataclass
class ContentRules:
    """The compiled rules of one file."""

    words: tuple[str, ...] = ()
    patterns: tuple[regex.Pattern, ...] = ()
    _automaton: object = field(default=None, repr=False)
    _prefixes: frozenset[str] = field(default=frozenset(), repr=False)  # proper prefixes of the (folded) words
    _longest: int = 0

    def __post_init__(self) -> None:
        if self.words:
            automaton = ahocorasick.Automaton()
            for word in self.words:
                automaton.add_word(word, len(word))
            automaton.make_automaton()
            self._automaton = automaton
            self._prefixes = frozenset(word[:n] for word in self.words for n in range(1, len(word)))
            self._longest = max(len(word) for word in self.words)

    @property
    def empty(self) -> bool:
        return not self.words and not self.patterns

    def __len__(self) -> int:
        return len(self.words) + len(self.patterns)

    def matches(self, text: str) -> list[tuple[int, int]]:
        """Every complete match in `text` as (start, end), overlapping ones merged, in order."""
        found = []
        if self._automaton is not None:
            for end, length in self._automaton.iter(fold(text)):
                found.append((end - length + 1, end + 1))
        for pattern in self.patterns:
            found += [m.span() for m in pattern.finditer(text) if m.end() > m.start()]
        return merged(found)

    def blocks(self, text: str) -> bool:
        """Whether a question says something a rule names."""
        return bool(self.matches(text))

    def mask(self, text: str) -> tuple[str, int]:
        """`text` with every match replaced by one `*` a character, and how many matches there were."""
        spans = self.matches(text)
        return masked(text, spans), len(spans)

    def scan(self, text: str) -> tuple[list[tuple[int, int]], int]:
        """One pass of each matcher over `text` (the text an answer holds back): its complete matches (merged, in
        order), and where its end could still turn into a match once more text comes: the start of the longest tail
        that begins a word, of a pattern's partial match, or of a complete match at the very end, which may go on
        (len(text) when nothing is open)."""
        found: list[tuple[int, int]] = []
        open_at = len(text)
        if self._automaton is not None:
            folded = fold(text)
            for end, length in self._automaton.iter(folded):
                found.append((end - length + 1, end + 1))
            for n in range(min(len(text), self._longest - 1), 0, -1):
                if folded[-n:] in self._prefixes:
                    open_at = len(text) - n
                    break
        for pattern in self.patterns:
            for m in pattern.finditer(text, partial=True):
                if not m.partial and m.end() > m.start():
                    found.append(m.span())
                if m.partial or m.end() == len(text):
                    open_at = min(open_at, m.start())
        return merged(found), open_at


NO_RULES = ContentRules()


def load(path: str) -> ContentRules:
    """The rules of the file at `path`.

    Raises:
        RulesError: it cannot be read, is not UTF-8 text, or a rule in it is wrong (one line naming the file).
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise RulesError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RulesError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse(text, path)


def parse(text: str, source: str) -> ContentRules:
    """The rules of a file's text: one a line; `#` begins a comment; blank lines are skipped; `re:<pattern>` is a
    regular expression, any other line a word or phrase (case-insensitive).

    Raises:
        RulesError: a pattern that does not compile, or one that matches the empty text.
    """
    words, patterns = [], []
    for number, line in enumerate(text.splitlines(), 1):
        rule = line.split("#", 1)[0].strip() if not line.lstrip().startswith(PATTERN_PREFIX) else line.strip()
        if not rule:
            continue
        if rule.startswith(PATTERN_PREFIX):
            source_pattern = rule[len(PATTERN_PREFIX) :]
            try:
                pattern = regex.compile(source_pattern, regex.V0)
            except regex.error as exc:
                raise RulesError(f"{source}:{number}: not a valid regular expression ({exc})") from None
            if pattern.fullmatch(""):
                raise RulesError(f"{source}:{number}: the pattern matches empty text (it would match everywhere)")
            patterns.append(pattern)
        else:
            words.append(fold(rule))
    return ContentRules(tuple(dict.fromkeys(words)), tuple(patterns))


def fold(text: str) -> str:
    """`text` in lower case, character for character (its length kept, so positions stay the same)."""
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


def merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans sorted, the overlapping and touching ones joined."""
    joined: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if joined and start <= joined[-1][1]:
            joined[-1] = (joined[-1][0], max(end, joined[-1][1]))
        else:
            joined.append((start, end))
    return joined


def masked(text: str, spans: list[tuple[int, int]]) -> str:
    parts, at = [], 0
    for start, end in spans:
        parts += [text[at:start], MASK * (end - start)]
        at = end
    parts.append(text[at:])
    return "".join(parts)
