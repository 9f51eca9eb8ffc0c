"""An answer's rest as a message of its own, over the long connection: what a bubble could not show (it closed
early, overflowed, or its stream was lost) goes out once through the outbox (aibot_send_msg by the connection's
holder), never through a response_url a long connection cannot count on. The streams layer calls it through its
`SendsSeparately` hook (services/streams/finisher.py)."""

from __future__ import annotations

import logging

from services.longconn.outbox import Outbox
from services.streams.job import StreamJob

logger = logging.getLogger(__name__)


class OutboxRests:
    def __init__(self, outbox: Outbox, owner: str):
        self.outbox = outbox
        self.owner = owner

    def send(self, job: StreamJob, markdown: str) -> bool:
        """Hand `markdown` to the outbox as the rest of `job`'s answer, once: the stream's outbox marker is claimed
        first, so the outbox's own pass never also sends its rest. Each try of one attempt claims as the same
        claimant and makes the same message (`rest.<stream id>`), so a try whose writes were applied but whose
        reply was lost is repeated without a second message.

        Raises:
            redis.RedisError: Redis did not answer (the caller tries again while it may).
        """
        if not self.outbox.claim(job.stream_id, f"{self.owner} {job.attempt}"):
            logger.info("the outbox sends this answer's rest already")
            return True
        message_id = f"rest.{job.stream_id}"
        if not self.outbox.posted(message_id):  # not made by an earlier try
            fields = {"msgid": f"rest:{job.stream_id}", "userid": job.userid, "chatid": job.chatid}
            fields["aibotid"] = job.aibotid
            self.outbox.post(message_id, self.owner, markdown, job.chatid or job.userid, not job.chatid, fields)
        self.outbox.sent(job.stream_id)
        return True
