"""What a user's message becomes: a command (/new, /reset, /stop, /help, /routes) answered at once, a polite
refusal of an empty message, the typed value or the file of a form that waits for it, or a question (the words, the
quote as context, the images and files) that opens a stream on the route that takes it (services/chat/routes.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from services.auth.authorizer import AuthError
from services.chat.admission import Admission
from services.chat.queries import (
    HELP,
    NEW_CONVERSATION,
    ROUTES,
    STOP,
    parse_command,
    quoted_image_urls,
    strip_mention,
    with_quote,
)
from services.chat.routes import OWN, Routing
from services.forms.answers import FormAnswers
from services.media.service import DOCUMENT, IMAGE, VIDEO
from services.redis_conn import REDIS_FAILURES
from services.streams.conversations import conversation_member
from services.streams.life import NOTE
from services.streams.life import STOP as STOP_ROW
from services.streams.service import StreamService
from services.streams.stop import AnswerStopper
from services.texts import Texts
from services.wecom.messages import UNSUPPORTED, Inbound

logger = logging.getLogger(__name__)


class MessageIntake:
    def __init__(
        self,
        streams: StreamService,
        routing: Routing,
        texts: Texts,
        bot_name: str,
        forms: FormAnswers,
        stopper: AnswerStopper,
        admission: Admission,
        authorize: Callable[[str], object] = lambda userid: None,
    ):
        self.admission = admission  # content rules and quotas
        self.authorize = authorize  # raises AuthError for a user who may not ask the bot (by default everyone may)
        self.stopper = stopper
        self.streams = streams
        self.routing = routing  # the bot's routes, and the conversations of each
        self.texts = texts
        self.bot_name = bot_name
        self.forms = forms
        # The bot was removed from BOTS_FILE: its answers under way finish, no new one starts (a callback's new
        # message is refused 404 before it gets here: CallbackHandler; a long connection's gets a note).
        self.retired = False

    def take(self, message: Inbound) -> dict:
        """The plaintext reply to a user's message (text, voice, image, mixed, file, video; any other type is
        answered with a finished bubble saying it is not supported)."""
        if self.retired:
            self.streams.count("bot_retired")
            logger.info("a message over the connection of a bot removed from BOTS_FILE: answered that it is retired")
            return self.streams.finish_at_once(self.texts.say("bot_retired"), message, NOTE)
        if message.msgtype == UNSUPPORTED:
            self.streams.count("unsupported")
            logger.info("a message of a type the gateway does not know: answered that it is not supported")
            return self.streams.finish_at_once(self.texts.say("unsupported_message"), message, NOTE)
        text = strip_mention(message.text, self.bot_name) if message.is_group else message.text.strip()
        command = parse_command(text)
        if command is not None:
            name, text = command
            self.streams.count("command")
            if name == HELP:
                return self.streams.finish_at_once(self.texts.say("help"), message)
            if name == STOP:
                return self._stop(message)
            if name == ROUTES:
                said = self.routing.listed(self.texts, message.userid, message.chatid)
                return self.streams.finish_at_once(said, message)
            if name == NEW_CONVERSATION:
                try:
                    said = self._new_conversation(message)
                except AuthError as refusal:
                    logger.info("not starting the group's conversation afresh: %s", refusal.code)
                    return self.streams.finish_at_once(self.texts.failure_note(refusal), message, NOTE)
                if not text:
                    return self.streams.finish_at_once(self.texts.say(said), message)

        attachments = _attachments(message)
        form = self.forms.waiting_for(message) if text or attachments else None
        if form is not None and attachments:  # a file for a form's field: not a question for Dify
            return self.streams.answer_at_once(message, lambda: self.forms.given(form, message, attachments))
        if form is not None:  # the value of a form's field, or its choice: not a question for Dify
            return self.streams.answer_at_once(message, lambda: self.forms.typed(form, message, text))
        choice = self.routing.table.choose(text, message.userid, message.chatid)
        if choice.route == OWN and self.routing.no_route_reply:
            self.streams.count("no_route")
            return self.streams.finish_at_once(self.routing.no_route_reply, message, NOTE)
        text = choice.question
        if not text and not attachments:
            self.streams.count("empty")
            return self.streams.finish_at_once(self.texts.say("empty_query"), message, NOTE)
        refused = self.admission.refusal(message, text)
        if refused is not None:
            self.streams.count(refused.outcome)
            return self.streams.finish_at_once(refused.note, message, refused.outcome)
        query = text or self.texts.say("image_query" if message.image_urls else "file_query")
        query = with_quote(query, message.quote, self.texts)
        return self.streams.open(message, query, typed_query=bool(text), attachments=attachments, route=choice.route)

    def _new_conversation(self, message: Inbound) -> str:
        """Forget the conversation the message would continue; returns what to say. A group that shares one is
        started afresh only by a member who may ask the bot.

        Raises:
            AuthError: the member may not ask (the group's conversation is left as it is).
        """
        shared = self.streams.shared_groups and message.is_group
        if shared:
            self.authorize(message.userid)
        member = conversation_member(message.userid, shared)
        for conversations in self.routing.conversations:  # the bot's own backend's, and each route's
            conversations.forget(message.aibotid, message.chatid, member)
        logger.info("conversation reset by the user%s", " for the whole group" if shared else "")
        return "new_group_conversation" if shared else "new_conversation"

    def _stop(self, message: Inbound) -> dict:
        try:
            stopped = self.stopper.stop_in_chat(message.aibotid, message.chatid, message.userid)
        except REDIS_FAILURES as exc:
            logger.warning("could not stop the answer: Redis did not answer (%s)", exc)
            return self.streams.finish_at_once(self.texts.say("store_unavailable"), message, NOTE, STOP_ROW)
        said = "stop_done" if stopped else "nothing_to_stop"
        return self.streams.finish_at_once(self.texts.say(said), message, kind=STOP_ROW)


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
