"""Messages an answer owes its user through the message's response_url (callback mode): written down, claimed by
their poster and listed before the first try, so that a poster that dies or freezes leaves them to another process's
sweep, and made once (docs/architecture.md, "Many replicas"). When Redis does not answer, the message is posted at
once without this record.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from functools import partial

import redis

from services.keys import REST_POST_CLAIM_TTL_SECONDS, REST_POST_TTL_SECONDS, SENT_TTL_SECONDS, Keys
from services.loops import run_until
from services.lua import LuaScript
from services.outage import best_effort
from services.redis_conn import REDIS_FAILURES
from services.replication import OUTBOX, Replication, raise_first_error
from services.streams import scripts
from services.wecom.response_url import ResponseUrlClient

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 3.0  # how often each process looks for posts whose poster is gone
PAGE = 20  # owed posts taken per sweep


class RestPosts:
    """One bot's posts through response_url, durable across the death of the process that made them."""

    def __init__(
        self, client: redis.Redis, keys: Keys, durable: Replication, responder: ResponseUrlClient, owner: str, bot: str
    ):
        self.client = client
        self.keys = keys
        self.durable = durable
        self.responder = responder
        self.owner = owner
        self.bot = bot
        self.owed_key = keys.rest_posts()
        self._renew = LuaScript(client, scripts.RENEW_CLAIM)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._also: Callable[[], object] = lambda: None
        self._unsettled: dict[str, str] = {}  # posts made without a record, and how they ended, to settle in Redis

    def send(self, stream_id: str, url: str, message: str) -> bool:
        """Post `message` through `url` for the stream, once: True if WeCom took it (here, or from a process that
        took the post over); False too when another message went that way first (a poll that gave the bubble up
        posted what it knew of the answer)."""
        token = self._token()
        try:
            claimed, earlier = self._owe(stream_id, url, message, token)
        except REDIS_FAILURES as exc:
            # Part of the record may have been written (a reply lost after its write ran, or a write Redis runs
            # when it wakes): once posted, the post is settled, so that no sweep takes a listing left behind for a
            # post whose poster is gone. That waits for Redis in this process's sweep, not in the caller, whose
            # answer's end must be kept at once where no outage reaches (Finisher._mark).
            logger.warning("could not write down the response_url post (%s); posting it without a record", exc)
            accepted = self.responder.send_markdown(url, message)
            self._unsettled[stream_id] = "sent" if accepted else "failed"
            return accepted
        if not claimed:
            if earlier != message:
                # (a poll gave the bubble up and posted the rest it knew, with the note that the answer was
                # interrupted: the URL takes one post, so this later, fuller one cannot go)
                logger.warning("another message went through this stream's response_url already; this one cannot")
                return False
            logger.info("the response_url post of this stream was made already; not again")
            return True
        return self._post(stream_id, url, message, token)

    def sweep(self) -> int:
        """Post what is owed and has no living poster (its claim lapsed); returns how many were taken here."""
        self.client.zremrangebyscore(self.owed_key, "-inf", time.time() - REST_POST_TTL_SECONDS)
        due = self.client.zrangebyscore(self.owed_key, "-inf", time.time() - REST_POST_CLAIM_TTL_SECONDS, 0, PAGE)
        taken = 0
        for stream_id in due:
            token = self._token()
            claim_key = self.keys.rest_post_claim(stream_id)
            [before] = self._write(claim_key, [_claim(claim_key, token)])
            if before not in (None, token):
                if before in ("sent", "failed"):
                    self.client.zrem(self.owed_key, stream_id)  # its poster ended it, and died before this
                continue
            owed = self.client.hgetall(self.keys.rest_post(stream_id))
            if not owed:
                self._settle(stream_id, "failed")  # expired with its URL
                continue
            logger.warning("a response_url post whose poster is gone is taken over here (stream %s)", stream_id)
            taken += 1
            self._post(stream_id, owed["url"], owed["message"], token)
        return taken

    def renew(self, stream_id: str, token: str) -> bool:
        """Renew the claim `token` on the stream's post; False when it lapsed and another process took it."""
        return bool(self._renew([self.keys.rest_post_claim(stream_id)], [token, REST_POST_CLAIM_TTL_SECONDS]))

    def _token(self) -> str:
        """A claim of this process that no other claim has."""
        return f"sending {self.owner} {secrets.token_hex(6)}"

    def start(self, also: Callable[[], object] = lambda: None) -> None:
        """Sweep in a thread of this process until `stop`, calling `also` after each sweep (another watch over
        what is owed through response_url: the bubbles closed before their answers ended)."""
        self._also = also
        self._thread = threading.Thread(target=self._run, name=f"rest-posts-{self.bot}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        def step() -> None:
            try:
                self._settle_unsettled()
                self.sweep()
                self._also()
            except REDIS_FAILURES as exc:
                logger.debug("could not sweep what is owed through response_url: %s", exc)
            self._stop.wait(SWEEP_SECONDS)

        run_until(self._stop, step, "rest_posts")

    def _owe(self, stream_id: str, url: str, message: str, token: str) -> tuple[bool, str | None]:
        """Write the post down, claimed by `token`, and list it: (True, None); (False, the message written down
        before) if it was claimed (or made) before."""
        post_key, claim_key = self.keys.rest_post(stream_id), self.keys.rest_post_claim(stream_id)
        replies = self._write(
            post_key,
            [
                ("HGET", post_key, "message"),
                _claim(claim_key, token),
                ("HSET", post_key, "url", url, "message", message),
                ("EXPIRE", post_key, REST_POST_TTL_SECONDS),
            ],
        )
        if replies[1] not in (None, token):
            return False, replies[0]
        # The list's entries age out by their score; its TTL, renewed with each, ends it when none is left.
        owed = [("ZADD", self.owed_key, time.time(), stream_id), ("EXPIRE", self.owed_key, REST_POST_TTL_SECONDS)]
        self._write(self.owed_key, owed)
        return True, None

    def _post(self, stream_id: str, url: str, message: str, token: str) -> bool:
        handed_over = []

        def still_ours() -> bool:
            try:
                ours = self.renew(stream_id, token)
            except REDIS_FAILURES:
                return True  # cannot tell: a claim that lapses meanwhile is found by the next renewal
            if not ours:
                handed_over.append(True)
            return ours

        accepted = self.responder.send_markdown(url, message, still_ours)
        if handed_over:
            return True  # another process posts it
        self._settle(stream_id, "sent" if accepted else "failed")
        return accepted

    def _settle_unsettled(self) -> None:
        """Settle the posts made without a record, now that Redis answers (raises while it does not)."""
        for stream_id, state in list(self._unsettled.items()):
            self._settle_now(stream_id, state)
            del self._unsettled[stream_id]

    def _settle(self, stream_id: str, state: str) -> None:
        """The post is over (`sent`, or `failed` for good): no process makes it again."""
        best_effort(partial(self._settle_now, stream_id, state), f"recording the response_url post as {state}")

    def _settle_now(self, stream_id: str, state: str) -> None:
        claim_key = self.keys.rest_post_claim(stream_id)
        self._write(claim_key, [("SET", claim_key, state, "EX", SENT_TTL_SECONDS)])
        self.client.zrem(self.owed_key, stream_id)

    def _write(self, key: str, commands: list[tuple]) -> list:
        replies = self.durable.execute(key, commands, OUTBOX)
        raise_first_error(replies)
        return replies


def _claim(claim_key: str, token: str) -> tuple:
    """The claim of a post by `token`; its reply is the claim that was there (None: none). A retry of it whose first
    try ran (a reply lost with its connection: the client sends it again) finds its own token, and still holds the
    claim; a bare SET NX would answer that retry as a claim someone else holds, and nobody would post."""
    return ("SET", claim_key, token, "NX", "GET", "EX", REST_POST_CLAIM_TTL_SECONDS)
