"""What the user's bubble shows at each stage of a stream.

The poll renders with it, and the worker uses the same functions to learn which part of the answer the bubble
could not show, so the two always agree on the remainder sent through `response_url`. No bubble or message shows a
link to Dify's own files (services/files/text_links.py): the answer's end resolves them, and until then, or when the
answer fails first, they are hidden from what is shown.
"""

from __future__ import annotations

from services.files.text_links import DifyLinks
from services.texts import Texts
from services.wecom.limits import MAX_CONTENT_BYTES, fit_bubble, fits
from utils.text import cut_utf8, utf8_len

# Why a bubble finished before its answer: WeCom's display window ran out, the text outgrew one bubble, or Redis was
# away at the answer's end and what the bubble had not shown went out as a message of its own.
WINDOW, OVERFLOW, SEPARATELY = "window", "overflow", "separately"


class BubbleRenderer:
    def __init__(self, texts: Texts, placeholder: str = "", links: DifyLinks | None = None):
        self.texts = texts
        self.placeholder = placeholder or texts.say("placeholder")
        self.links = links or DifyLinks()  # the bot's Dify file links, never shown

    def live(self, text: str, prompt: str = "") -> str:
        """While the answer streams: the text so far (cut to the limit), or the placeholder; below it, the `prompt`
        of a form waiting for its answer."""
        if prompt:
            return self.links.hide(fit_bubble(text, prompt, prompt)[0], live=True)
        return self.links.hide(fit_bubble(text, "", self.placeholder)[0], live=True)

    def close_note(self, reason: str, has_response_url: bool) -> str:
        """The note of a bubble closed early (window or overflow), promising the rest only when we can send it; or
        saying that the rest was sent."""
        if reason == SEPARATELY:
            return self.texts.say("rest_sent_separately")
        if reason == WINDOW:
            return self.texts.say("window_continues" if has_response_url else "window_closed")
        return self.texts.say("overflow_continues" if has_response_url else "overflow_truncated")

    def closed(self, text_at_close: str, reason: str, has_response_url: bool) -> tuple[str, int]:
        """A bubble finished early: (content, characters of the text it shows)."""
        whole_elsewhere = reason == SEPARATELY and not text_at_close  # the answer went out whole, separately
        note = self.texts.say("sent_separately") if whole_elsewhere else self.close_note(reason, has_response_url)
        content, shown = fit_bubble(text_at_close, note, self.placeholder)
        return self.links.hide(content), shown

    def unshown(self, text: str, closed_bytes: int, reason: str) -> str:
        """What a bubble closed early (at `closed_bytes` of the answer, for `reason`) did not show of `text`, the
        answer as it stands now: the part owed as a message of its own."""
        shown = self.closed(text_at_close(text, closed_bytes), reason, True)[1]
        return text[shown:]

    def final(self, text: str, note: str, has_response_url: bool) -> tuple[str, int]:
        """The finished answer with its note; an answer too long for one bubble says the rest follows."""
        if fits(text, note):
            content, shown = fit_bubble(text, note, self.placeholder)
        else:
            overflow = self.close_note(OVERFLOW, has_response_url)
            content, shown = fit_bubble(text, f"{note} {overflow}" if note else overflow, self.placeholder)
        return self.links.hide(content), shown

    def rest(self, text: str, note: str, close_reason: str = "", closed_bytes: int = 0) -> str:
        """What the bubble of an ended answer (`text`, its `note`) did not show, as the message sent on its own: after
        what it showed when it closed early, with the note; or after what its final reply showed; '' when that
        showed it all."""
        if close_reason:
            return self.remainder(self.unshown(text, closed_bytes, close_reason), note)
        shown = self.final(text, note, True)[1]
        return self.remainder(text[shown:]) if shown < len(text) else ""

    def remainder(self, remainder: str, note: str = "", header_key: str = "continued") -> str:
        """The markdown sent on its own (response_url, aibot_send_msg): the part the bubble could not show, plus a
        closing note."""
        header = self.texts.say(header_key)
        tail = f"\n\n{note}" if note else ""
        body = f"{header}\n\n{remainder.lstrip()}" if remainder.strip() else self.texts.say("nothing_more")
        if utf8_len(body + tail) > MAX_CONTENT_BYTES:
            tail = f"\n\n{self.texts.say('remainder_truncated')}{' ' + note if note else ''}"
            body = cut_utf8(body, MAX_CONTENT_BYTES - utf8_len(tail))
        return self.links.hide(body + tail)

    def separate(self, text: str, note: str) -> str:
        """The markdown of an answer that has no bubble (the rest of a run after a form's answer): a header, the
        text and the note, cut to what one message holds."""
        body = "\n\n".join(part for part in (self.texts.say("form_rest"), text.strip(), note) if part)
        return self.links.hide(cut_utf8(body, MAX_CONTENT_BYTES))


def text_at_close(text: str, closed_bytes: int) -> str:
    """The answer as it stood when the bubble closed (the Lua script records its length in bytes)."""
    return text.encode()[:closed_bytes].decode("utf-8", errors="ignore")


def overflow_threshold(renderer: BubbleRenderer) -> int:
    """Bytes of answer a live bubble can show before it must close with the (longest) overflow note."""
    notes = (renderer.close_note(OVERFLOW, True), renderer.close_note(OVERFLOW, False))
    return MAX_CONTENT_BYTES - max(utf8_len("\n\n" + note) for note in notes)
