"""WeCom's limits on an AI bot's bubbles and replies (docs/protocol.md), and the arithmetic that fits an answer into
them. Two kinds of limit live with the code that keeps them: the messages one chat may get (30 a minute, 1,000 an
hour: services/longconn/pacing.py) and media uploads' chunks and sizes (services/longconn/uploads.py)."""

from __future__ import annotations

from utils.text import cut_utf8, utf8_len

MAX_CONTENT_BYTES = 20480  # stream content and response_url markdown, UTF-8 bytes
MAX_IN_FLIGHT_PER_USER = 3  # open bubbles per user per bot
POLL_WINDOW_SECONDS = 360  # WeCom polls a stream this long after the user's message
# Our default for STREAM_WINDOW_SECONDS: a bubble is finished this long after its message, well inside WeCom's window.
BUBBLE_WINDOW_SECONDS = 330
MAX_REPLY_IMAGES = 10  # msg_item images, final reply only
MAX_REPLY_IMAGE_BYTES = 10 * 1024 * 1024  # each, before base64
MAX_INBOUND_FILE_BYTES = 100 * 1024 * 1024

NOTE_SEPARATOR = "\n\n"


def fit_bubble(text: str, note: str, placeholder: str = "", limit: int = MAX_CONTENT_BYTES) -> tuple[str, int]:
    """The bubble content for `text` plus `note`, cut to `limit` bytes at a character boundary, keeping the note.

    Returns (content, how many characters of `text` it shows).
    """
    if not text:
        return cut_utf8(note or placeholder, limit), 0
    if not note:
        shown = cut_utf8(text, limit)
        return shown, len(shown)
    tail = NOTE_SEPARATOR + note
    body = text.rstrip()
    if utf8_len(body) + utf8_len(tail) <= limit:
        return body + tail, len(text)
    shown = cut_utf8(body, limit - utf8_len(tail))
    return shown + tail, len(shown)


def fits(text: str, note: str = "", limit: int = MAX_CONTENT_BYTES) -> bool:
    """Whether `text` (with `note`) fits in one bubble whole."""
    extra = utf8_len(NOTE_SEPARATOR + note) if note and text else utf8_len(note)
    return utf8_len(text) + extra <= limit
