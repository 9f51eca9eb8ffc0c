"""The callback endpoint's logic, without Flask: check, decrypt, dispatch by msgtype, encrypt the reply.

Anything wrong with the request itself raises CallbackError (a 4xx). Once a callback is authentic, every failure
behind it becomes an encrypted, finished stream reply with a short note, so the user's bubble never spins;
the one exception is a poll while Redis is down, answered 503 so WeCom polls again and the bubble keeps its text.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping

import orjson
import redis

from services import metrics
from services.chat.conversations import ConversationStore
from services.chat.media import DOCUMENT, IMAGE, VIDEO
from services.chat.queries import HELP, NEW_CONVERSATION, parse_command, quoted_image_urls, strip_mention, with_quote
from services.chat.texts import Texts
from services.dify.app_profile import DifyAppProfile
from services.dify.feedback import FeedbackService
from services.streams.service import StreamService, new_stream_id
from services.wecom import errors
from services.wecom.crypto import CryptoError, WeComCrypto
from services.wecom.messages import Inbound, parse_inbound, stream_reply, text_reply
from services.wecom.replay_guard import ReplayGuard
from utils.logging import bind_log_context

logger = logging.getLogger(__name__)


_TIMESTAMP = re.compile(r"[0-9]{1,12}")


class StoreUnavailable(Exception):
    """Redis did not answer while serving a poll; the route answers 503 and WeCom polls again."""


class CallbackHandler:
    """Turns one raw callback into the bytes to answer with."""

    def __init__(
        self,
        crypto: WeComCrypto,
        streams: StreamService,
        texts: Texts,
        timestamp_tolerance: int,
        conversations: ConversationStore,
        profile: DifyAppProfile,
        feedback: FeedbackService,
        replays: ReplayGuard,
        bot_name: str = "",
        welcome_message: str = "",
    ):
        self.crypto = crypto
        self.streams = streams
        self.texts = texts
        self.timestamp_tolerance = timestamp_tolerance
        self.conversations = conversations
        self.profile = profile
        self.feedback = feedback
        self.replays = replays
        self.bot_name = bot_name
        self.welcome_message = welcome_message

    # --- GET: URL verification ----------------------------------------------------------------------------

    def verify_url(self, query: Mapping[str, str]) -> str:
        """The plaintext echo for WeCom's URL check.

        Raises:
            CallbackError: missing parameters, bad signature or an undecryptable echostr.
        """
        signature, timestamp, nonce = self._envelope_params(query)
        echostr = query.get("echostr")
        if not echostr:
            raise errors.missing_parameter("echostr")
        try:
            return self.crypto.verify_url(signature, timestamp, nonce, echostr)
        except CryptoError as exc:
            raise errors.from_crypto_error(exc) from None

    # --- POST: messages, polls and events -----------------------------------------------------------------

    def handle(self, query: Mapping[str, str], body: bytes) -> dict | None:
        """The encrypted reply envelope for a POST callback, or None for an empty reply.

        Raises:
            CallbackError: the request is malformed, unsigned, stale or undecryptable.
            StoreUnavailable: a poll could not reach Redis.
        """
        signature, timestamp, nonce = self._envelope_params(query)
        encrypted = _encrypt_field(body)
        try:
            plaintext = self.crypto.open_envelope(signature, timestamp, nonce, encrypted)
        except CryptoError as exc:
            raise errors.from_crypto_error(exc) from None
        message = parse_inbound(plaintext)
        bind_log_context(msgid=message.msgid or None, user=message.userid or None, chat=message.chatid or None)
        kind = f"event:{message.event_type}" if message.msgtype == "event" else message.msgtype
        if message.msgtype == "event" and not self._first_time(signature):
            metrics.CALLBACKS.labels(kind, "replayed").inc()
            logger.info("repeated event callback: answered without doing it again")
            return self._seal(self._replayed_event(message), nonce)
        started = time.perf_counter()
        try:
            reply = self.dispatch(message)
        except StoreUnavailable:
            metrics.CALLBACKS.labels(kind, "store_unavailable").inc()
            raise
        metrics.CALLBACKS.labels(kind, "ok").inc()
        if message.msgtype == "stream":
            metrics.POLL_SECONDS.observe(time.perf_counter() - started)
        return self._seal(reply, nonce)

    def _seal(self, reply: dict | None, nonce: str) -> dict | None:
        if reply is None:
            return None
        return self.crypto.seal_reply(orjson.dumps(reply).decode(), nonce, int(time.time()))

    def _first_time(self, signature: str) -> bool:
        try:
            return self.replays.first_time(signature)
        except redis.RedisError as exc:
            logger.warning("replay check unavailable (%s); handling the event", exc)
            return True

    def _replayed_event(self, message: Inbound) -> dict | None:
        """The reply to a repeated event, without its side effects (the welcome is the same; feedback is not
        forwarded twice)."""
        if message.event_type == "enter_chat":
            welcome = self.welcome_text()
            return text_reply(welcome) if welcome else None
        return None

    def dispatch(self, message: Inbound) -> dict | None:
        """The plaintext reply for an authentic message; failures behind it become finished replies."""
        try:
            if message.msgtype == "stream":
                bind_log_context(stream=message.stream_id)
                return self.streams.poll(message.stream_id)
            if message.msgtype == "event":
                return self._on_event(message)
            return self._on_message(message)
        except redis.RedisError as exc:
            if message.msgtype == "stream":
                logger.warning("Redis unavailable while answering a poll: %s", exc)
                raise StoreUnavailable from exc
            logger.warning("Redis unavailable while taking a message: %s", exc)
            return stream_reply(new_stream_id(), self.texts.say("store_unavailable"), finish=True)
        except Exception:
            logger.exception("failed to handle a %s callback", message.msgtype)
            if message.msgtype == "event":
                return None
            return stream_reply(message.stream_id or new_stream_id(), self.texts.say("internal_error"), finish=True)

    def _on_message(self, message: Inbound) -> dict:
        text = strip_mention(message.text, self.bot_name) if message.is_group else message.text.strip()
        command = parse_command(text)
        if command is not None:
            name, text = command
            metrics.MESSAGES.labels("command").inc()
            if name == HELP:
                return self.streams.finish_at_once(self.texts.say("help"))
            if name == NEW_CONVERSATION:
                self.conversations.forget(message.aibotid, message.chatid, message.userid)
                logger.info("conversation reset by the user")
                if not text:
                    return self.streams.finish_at_once(self.texts.say("new_conversation"))

        attachments = [(IMAGE, url) for url in message.image_urls]
        if message.quote:
            attachments += [(IMAGE, url) for url in quoted_image_urls(message.quote)]
        if message.msgtype in ("file", "video") and message.file_url:
            attachments.append((DOCUMENT if message.msgtype == "file" else VIDEO, message.file_url))
        if not text and not attachments:
            metrics.MESSAGES.labels("empty").inc()
            return self.streams.finish_at_once(self.texts.say("empty_query"))
        query = text or self.texts.say("image_query" if message.image_urls else "file_query")
        query = with_quote(query, message.quote, self.texts)
        return self.streams.open(message, query, typed_query=bool(text), attachments=attachments)

    def _on_event(self, message: Inbound) -> dict | None:
        logger.info("event %s received", message.event_type)
        if message.event_type == "enter_chat":
            welcome = self.welcome_text()
            return text_reply(welcome) if welcome else None
        if message.event_type == "feedback_event":
            self.feedback.submit(message.event)
        return None

    def welcome_text(self) -> str:
        """WELCOME_MESSAGE, else the Dify app's opening statement with its suggested questions, else nothing."""
        if self.welcome_message:
            return self.welcome_message
        parameters = self.profile.parameters(timeout=2.0)
        opening = str(parameters.get("opening_statement") or "").strip()
        questions = [q for q in parameters.get("suggested_questions") or [] if isinstance(q, str) and q.strip()]
        if not opening:
            return ""
        if questions:
            opening += "\n\n" + self.texts.say("welcome_suggestions") + "\n" + "\n".join(f"- {q}" for q in questions)
        return opening

    # --- request checks -----------------------------------------------------------------------------------

    def _envelope_params(self, query: Mapping[str, str]) -> tuple[str, str, str]:
        values = []
        for name in ("msg_signature", "timestamp", "nonce"):
            value = query.get(name)
            if not value:
                raise errors.missing_parameter(name)
            values.append(value)
        signature, timestamp, nonce = values
        if not _TIMESTAMP.fullmatch(timestamp):  # ASCII digits: str.isdigit() also accepts the digit '²'
            raise errors.invalid_timestamp()
        if abs(time.time() - int(timestamp)) > self.timestamp_tolerance:
            raise errors.timestamp_out_of_window(self.timestamp_tolerance)
        return signature, timestamp, nonce


def _encrypt_field(body: bytes) -> str:
    """The `encrypt` string of a POST body, or CallbackError."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise errors.invalid_body("body is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("encrypt"), str) or not data["encrypt"]:
        raise errors.invalid_body("body must be a JSON object with an 'encrypt' string")
    return data["encrypt"]
