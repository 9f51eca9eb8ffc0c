"""Which of a bot's routes takes a message (docs/configuration.md, "Routes"): the first route, in the bots file's
order, whose every condition holds (the message begins with its command, comes from one of its chats, from one of
its users); none, the bot's own backend.

Choosing is an index, not a scan: each route is one bit, and each condition's value (a command, a chat, a user)
maps to the routes it lets through, those without such a condition among them. A message's routes are then three
lookups and two ANDs of Python ints, the first route the lowest bit set: under 2 µs at 1,000 routes, where
checking the routes one by one takes 39 µs (BENCHMARKS.md, "Routes"); a plain reading wins below about 30 routes,
by a fraction of a microsecond.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.chat.queries import first_word

if TYPE_CHECKING:
    from config.settings import RouteSettings
    from services.streams.conversations import ConversationStore
    from services.texts import Texts

OWN = ""  # the route name of an answer from the bot's own backend


@dataclass(frozen=True, slots=True)
class Choice:
    """The route a message takes (`OWN`: none), the question it asks (without the route's command), and why."""

    route: str
    question: str
    why: str


class _Condition:
    """One kind of condition (command, chat or user): the routes each value lets through."""

    def __init__(self, values_of_routes: list[tuple[str, ...]]):
        self.unconditional = 0  # the routes that do not give this condition: any value passes
        self.by_value: dict[str, int] = {}
        for bit, values in enumerate(values_of_routes):
            if not values:
                self.unconditional |= 1 << bit
            for value in values:
                self.by_value[value] = self.by_value.get(value, 0) | 1 << bit

    def passing(self, value: str) -> int:
        return self.unconditional | self.by_value.get(value, 0)


class RouteTable:
    """A bot's routes, in the file's order."""

    def __init__(self, routes: tuple[RouteSettings, ...]):
        self.routes = routes
        self._commands = _Condition([(r.command,) if r.command else () for r in routes])
        self._chats = _Condition([r.chats for r in routes])
        self._users = _Condition([r.users for r in routes])

    def choose(self, text: str, userid: str, chatid: str = "") -> Choice:
        """The route of a message whose text (a group's @mention taken off) is `text`, from `userid` in the group
        `chatid` ("" for a 1:1 chat)."""
        head, rest = first_word(text)
        command = head if head.startswith("/") else ""
        routes = self._commands.passing(command) & self._chats.passing(chatid) & self._users.passing(userid)
        if not routes:
            return Choice(OWN, text, "no route takes it")
        route = self.routes[(routes & -routes).bit_length() - 1]
        question = rest if route.command else text
        return Choice(route.name, question, _why(route))

    def open_to(self, userid: str, chatid: str = "") -> list[RouteSettings]:
        """The routes whose command this user may use in this chat (their chats and users let them)."""
        return [r for r in self.routes if r.command and self.choose(r.command, userid, chatid).route == r.name]


def _why(route: RouteSettings) -> str:
    given = [f"the command {route.command}"] if route.command else []
    given += ["the chat is one of its chats"] if route.chats else []
    given += ["the user is one of its users"] if route.users else []
    return f"route {route.name}: " + " and ".join(given)


@dataclass(frozen=True)
class Routing:
    """A bot's routes as its messages meet them: the table, the reply to a message no route takes (empty: the
    bot's own backend answers it), and the conversations of the bot's own backend and of each route's (a user's
    `/new` starts over all of them)."""

    table: RouteTable
    conversations: tuple[ConversationStore, ...]
    no_route_reply: str = ""

    def listed(self, texts: Texts, userid: str, chatid: str = "") -> str:
        """What `/routes` says to this user in this chat: the commands they may use, and where a question asked
        without one goes."""
        lines = [
            texts.say("routes_command").format(command=route.command, route=route.name)
            for route in self.table.open_to(userid, chatid)
        ]
        said = [texts.say("routes_commands").format(commands="\n".join(lines)) if lines else texts.say("routes_none")]
        here = self.table.choose("", userid, chatid).route
        if here:
            said.append(texts.say("routes_here").format(route=here))
        else:
            said.append(texts.say("routes_closed" if self.no_route_reply else "routes_own"))
        return "\n\n".join(said)
