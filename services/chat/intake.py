"""What a user's message becomes: a command (/new, /reset, /help) answered at once, a polite refusal of an
empty message, the typed value of a form that waits for it, or a question (the words, the quote as context, the
images and files) that opens a stream."""

from __future__ import annotations

import logging

from services.chat.queries import HELP, NEW_CONVERSATION, parse_command, quoted_image_urls, strip_mention, with_quote
from services.forms.service import FormService
from services.media.service import DOCUMENT, IMAGE, VIDEO
from services.streams.conversations import ConversationStore
from services.streams.service import StreamService
from services.texts import Texts
from services.wecom.messages import UNSUPPORTED, Inbound

logger = logging.getLogger(__name__)


class MessageIntake:
    def __init__(
        self,
        streams: StreamService,
        conversations: ConversationStore,
        texts: Texts,
        bot_name: str = "",
        forms: FormService | None = None,
    ):
        self.streams = streams
        self.conversations = conversations
        self.texts = texts
        self.bot_name = bot_name
        self.forms = forms

    def take(self, message: Inbound) -> dict:
        """The plaintext reply to a user's message (text, voice, image, mixed, file, video; any other type is
        answered with a finished bubble saying it is not supported)."""
        if message.msgtype == UNSUPPORTED:
            self.streams.count("unsupported")
            logger.info("a message of a type the gateway does not know: answered that it is not supported")
            return self.streams.finish_at_once(self.texts.say("unsupported_message"))
        text = strip_mention(message.text, self.bot_name) if message.is_group else message.text.strip()
        command = parse_command(text)
        if command is not None:
            name, text = command
            self.streams.count("command")
            if name == HELP:
                return self.streams.finish_at_once(self.texts.say("help"))
            if name == NEW_CONVERSATION:
                self.conversations.forget(message.aibotid, message.chatid, message.userid)
                logger.info("conversation reset by the user")
                if not text:
                    return self.streams.finish_at_once(self.texts.say("new_conversation"))

        form = self.forms.waiting_for(message) if self.forms is not None and text else None
        if form is not None:  # the value of a form's field, or its choice: not a question for Dify
            return self.streams.answer_at_once(message, lambda: self.forms.typed(form, message, text))
        attachments = _attachments(message)
        if not text and not attachments:
            self.streams.count("empty")
            return self.streams.finish_at_once(self.texts.say("empty_query"))
        query = text or self.texts.say("image_query" if message.image_urls else "file_query")
        query = with_quote(query, message.quote, self.texts)
        return self.streams.open(message, query, typed_query=bool(text), attachments=attachments)


def _attachments(message: Inbound) -> list[tuple[str, ...]]:
    """(kind, url) of every image, quoted image and file the message carries; (kind, url, aeskey) for media that
    carry their own key (long-connection mode)."""
    attachments = [(IMAGE, url) for url in message.image_urls]
    if message.quote:
        attachments += [(IMAGE, url) for url in quoted_image_urls(message.quote)]
    if message.msgtype in ("file", "video") and message.file_url:
        attachments.append((DOCUMENT if message.msgtype == "file" else VIDEO, message.file_url))
    keys = message.media_keys
    return [(kind, url, keys[url]) if url in keys else (kind, url) for kind, url in attachments]
