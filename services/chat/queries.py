"""From a WeCom message to the question Dify gets: group @mentions stripped, quoted messages given as context,
and the bot's own commands recognised (/new, /reset, /stop, /help, /routes)."""

from __future__ import annotations

import re

from services.texts import Texts

NEW_CONVERSATION, HELP, STOP, ROUTES = "new", "help", "stop", "routes"
COMMANDS = {
    "/new": NEW_CONVERSATION,
    "/reset": NEW_CONVERSATION,
    "/新对话": NEW_CONVERSATION,
    "/help": HELP,
    "/stop": STOP,
    "/停止": STOP,
    "/cancel": STOP,
    "/routes": ROUTES,
}
_LEADING_MENTION = re.compile(r"^\s*@\S+\s*")
_QUOTED_MARKERS = {"image": "quoted_image", "file": "quoted_file", "video": "quoted_video"}


def strip_mention(text: str, bot_name: str = "") -> str:
    """Remove the bot's @mention from a group message: every `@bot_name` when the name is configured (names may
    contain spaces), else the leading @mention WeCom puts first."""
    if bot_name:
        stripped = re.sub(rf"@{re.escape(bot_name)}\s*", "", text)
        if stripped != text:
            return stripped.strip()
    return _LEADING_MENTION.sub("", text, count=1).strip()


def first_word(text: str) -> tuple[str, str]:
    """A message's first word, lower-cased, and the rest. A word ends at any space (a full-width one, a line break),
    and a full-width solidus begins a command as "/" does: `／停止` and `/新对话　你好` are typed so on a Chinese
    keyboard."""
    head, rest = (text.split(maxsplit=1) + ["", ""])[:2]
    if head.startswith("／"):
        head = "/" + head[1:]
    return head.lower(), rest.strip()


def parse_command(text: str) -> tuple[str, str] | None:
    """(command, the rest of the text) for `/new`, `/reset`, `/stop`, `/help`, `/routes`; None for a question."""
    head, rest = first_word(text)
    command = COMMANDS.get(head)
    return (command, rest) if command else None


def quoted_summary(quote: dict, texts: Texts) -> str:
    """A text rendering of a quoted message: its words, with markers for images, files and videos."""
    kind = quote.get("msgtype")
    body = quote.get(kind) if isinstance(quote.get(kind), dict) else {}
    if kind in ("text", "voice"):
        return str(body.get("content") or "")
    if kind == "mixed":
        parts = []
        for item in body.get("msg_item") or []:
            if not isinstance(item, dict):
                continue
            if item.get("msgtype") == "text":
                parts.append(str((item.get("text") or {}).get("content") or ""))
            elif item.get("msgtype") == "image":
                parts.append(texts.say("quoted_image"))
        return " ".join(p for p in parts if p)
    marker = _QUOTED_MARKERS.get(kind)
    return texts.say(marker) if marker else ""


def quoted_image_urls(quote: dict) -> list[str]:
    """Image URLs inside a quoted image or mixed message (attached to the question when the app takes images)."""
    kind = quote.get("msgtype")
    body = quote.get(kind) if isinstance(quote.get(kind), dict) else {}
    if kind == "image" and isinstance(body.get("url"), str):
        return [body["url"]]
    if kind == "mixed":
        return [
            item["image"]["url"]
            for item in body.get("msg_item") or []
            if isinstance(item, dict)
            and item.get("msgtype") == "image"
            and isinstance(item.get("image"), dict)
            and isinstance(item["image"].get("url"), str)
        ]
    return []


def with_quote(query: str, quote: dict | None, texts: Texts) -> str:
    """The question with the quoted message before it, as context."""
    if not quote:
        return query
    summary = quoted_summary(quote, texts).strip()
    if not summary:
        return query
    block = "\n".join(f"> {line}" for line in summary.splitlines())
    return texts.say("quote_context").format(quoted=block, query=query)
