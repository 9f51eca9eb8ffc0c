"""Parts built the first time they are used: a bot's routes may be a thousand, each with its Dify client and backend,
of which a process may never use most (BENCHMARKS.md, "Routes": built at start-up, 1,000 routes cost each worker
10 MB and 0.6 s; built on use, what the routes used)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")


class OnUse(Mapping[str, T]):
    """A part for each of `names`, built by `build(name)` the first time it is asked for (once, whichever thread
    asks first); iterating names every part, building none."""

    def __init__(self, names: Iterable[str], build: Callable[[str], T]):
        self._names = tuple(names)
        self._known = frozenset(self._names)
        self._build = build
        self._built: dict[str, T] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> T:
        part = self._built.get(name)
        if part is not None:
            return part
        if name not in self._known:
            raise KeyError(name)
        with self._lock:
            if name not in self._built:
                self._built[name] = self._build(name)
            return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def built(self) -> list[T]:
        """The parts built so far (what there is to close)."""
        with self._lock:
            return list(self._built.values())


class Mapped(Mapping[str, U]):
    """`source`'s parts seen through `attribute` (e.g. each route's Dify client), built on use as `source`'s are."""

    def __init__(self, source: Mapping[str, T], attribute: Callable[[T], U]):
        self._source = source
        self._attribute = attribute

    def __getitem__(self, name: str) -> U:
        return self._attribute(self._source[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)
