"""Where a tick's answer goes: each target of the schedule, through the pushes the push API makes (services/push),
with an Idempotency-Key per tick, target and part, so a push repeated by a process that took the pushing over gets
the first one's status and sends nothing again. An answer longer than what a target takes goes in parts, cut at
line ends. The users, departments and tags of one schedule go in one send through the self-built app, as WeCom's
message/send takes them."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.push.app import APP_MARKDOWN_BYTES, AppPushes, AppTargets
from services.push.direct import SENDING, UNKNOWN
from services.push.pushes import BotPushes, Target
from services.push.webhooks import WEBHOOK_MARKDOWN_BYTES, WebhookMessage, WebhookPushes
from services.wecom.limits import MAX_CONTENT_BYTES
from utils.text import cut_utf8, utf8_len

logger = logging.getLogger(__name__)

APP_KINDS = ("user", "party", "tag")


class SentNothing(Exception):
    """A part's push failed before anything went out (WeCom could not be reached): the same keys send it later."""


@dataclass(frozen=True)
class Pushers:
    """A bot's ways to push (None: the bot has none of that kind)."""

    webhooks: WebhookPushes | None = None
    app: AppPushes | None = None
    chats: BotPushes | None = None  # a long-connection bot's


def groups(targets: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The pushes a schedule's targets make, in order: one per webhook and chat, one for all users, departments
    and tags (the app's send takes them together)."""
    through_app = tuple(t for t in targets if t.partition(":")[0] in APP_KINDS)
    found: list[tuple[str, ...]] = [(t,) for t in targets if t.partition(":")[0] not in APP_KINDS]
    return [*found, through_app] if through_app else found


def parts(text: str, most_bytes: int) -> list[str]:
    """`text` in parts of at most `most_bytes` UTF-8 bytes, cut at a line's end where one is in the last half."""
    found = []
    while utf8_len(text) > most_bytes:
        head = cut_utf8(text, most_bytes)
        cut = head.rfind("\n")
        if cut > len(head) // 2:
            head = head[: cut + 1]
        found.append(head)
        text = text[len(head) :]
    return [*found, text] if text.strip() or not found else found


def push_group(pushers: Pushers, group: tuple[str, ...], text: str, key: str) -> str:
    """Push `text` to one group of targets (groups()), once per part: the status said for each (sent, queued,
    partial, failed or unknown, with ": <error>" when there is one). `key` names the tick; each part's
    Idempotency-Key is `key`, the group and the part's number.

    Raises:
        OverQuota: a webhook had WeCom's 20 a minute, a target of the app its 30, or a chat its limit (the parts
            before went out; a later pass sends the rest).
        SentNothing: a part failed before anything of it went out (the parts before went out; a later pass with
            the same keys sends the rest).
        redis.RedisError: Redis did not answer (a later pass goes on: what went out is not sent again).
    """
    kind, _, value = group[0].partition(":")
    said = []
    if kind == "webhook":
        for number, part in enumerate(parts(text, WEBHOOK_MARKDOWN_BYTES)):
            _, status, _ = pushers.webhooks.push(value, WebhookMessage(part, True), f"{key}:{group[0]}:{number}")
            said.append(_said(status))
    elif kind == "chat":
        for number, part in enumerate(parts(text, MAX_CONTENT_BYTES)):
            pushers.chats.push(Target(value, single=False), part, f"{key}:{group[0]}:{number}")
            said.append("queued")
    else:
        ids = {k: "|".join(t.partition(":")[2] for t in group if t.startswith(f"{k}:")) for k in APP_KINDS}
        to = AppTargets(ids["user"], ids["party"], ids["tag"])
        for number, part in enumerate(parts(text, APP_MARKDOWN_BYTES)):
            _, status, _ = pushers.app.push(to, part, f"{key}:app:{number}")
            said.append(_said(status))
    return _worst(said)


def _said(status: dict) -> str:
    """A push's status as a tick records it; a push still `sending` when its process died is `unknown`.

    Raises:
        SentNothing: the push sent nothing.
    """
    if status.get("sent_nothing"):
        raise SentNothing(status.get("error", ""))
    found = UNKNOWN if status["status"] == SENDING else status["status"]
    return f"{found}: {status['error']}" if status.get("error") else found


_ORDER = ("failed", "unknown", "partial", "queued", "sent")


def _worst(said: list[str]) -> str:
    """Of a group's parts, what is said of the whole: its worst part's status."""
    return min(said, key=lambda s: _ORDER.index(s.partition(":")[0]) if s.partition(":")[0] in _ORDER else 0)
