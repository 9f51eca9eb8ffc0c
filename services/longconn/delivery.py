"""Long-connection mode's Delivery (services/streams/delivery.py): a new answer waits in the bot's queue for whichever
serving process takes it (jobs.py), each stream is followed by the connection's outbox (outbox.py), and what a bubble
cannot show goes out once through the outbox (aibot_send_msg by the connection's holder), never through a
response_url a long connection cannot count on. Its end waits for Redis: the bubble shows what the holder sent,
which only Redis knows."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from services import metrics
from services.longconn.jobs import JobQueue
from services.longconn.keeper import FRAME_INTERVAL
from services.longconn.outbox import Outbox, separate_tracking, tracking
from services.outage import best_effort_value, delays_for
from services.streams.job import StreamJob
from services.streams.poll_path import Snapshot
from services.wecom.messages import Inbound

logger = logging.getLogger(__name__)


class ConnectionDelivery:
    """A long-connection bot's ways to the user besides a stream's own frames."""

    mode = "long_connection"
    # WeCom delivers a message once, to the holder: it takes it even while it drains or is full, and the answer waits
    # in the queue for a serving process
    runs_here = False
    waits_for_redis = True
    append_pace = FRAME_INTERVAL  # its bubbles get a frame at most that often
    append_deadlines = False  # a frame shows what was recorded, whenever the append lands

    def __init__(self, queue: JobQueue, outbox: Outbox, owner: str, bot: str):
        self.queue = queue
        self.outbox = outbox
        self.owner = owner
        self.bot = bot

    def dispatch(self, job: StreamJob, run_here: Callable[[StreamJob], None]) -> None:
        self.queue.submit(job.stream_id, job.attempt)  # any replica's consumer takes it; the outbox follows it

    def tracking(self, message: Inbound) -> dict[str, str]:
        """Answered on the frame's req_id; a message no frame of this connection carries (one kept while Redis was
        away by a process now gone, services/longconn/spool.py) is answered as a message of its own."""
        if message.ws_req_id:
            return tracking(*_answered_on(message))
        return separate_tracking(message.chatid or message.userid, not message.chatid)

    def track(self, stream_id: str, message: Inbound) -> None:
        """A redelivery comes on a new connection: the stream is answered on its req_id, of its generation (the
        outbox delivers the rest if that req_id dies)."""
        if message.ws_req_id:
            self.outbox.track(stream_id, *_answered_on(message))

    def keep_end(self, job: StreamJob, status: str, fields: dict[str, str]) -> None:
        return None  # an end here waits for Redis: none goes out without it

    def kept_end(self, stream_id: str) -> tuple[str, dict[str, str]] | None:
        return None

    def separate_url(self, response_url: str) -> str:
        return ""  # never a response_url on a long connection

    def opened_separately(self, job: StreamJob) -> None:
        self.outbox.track_separate(job.stream_id, job.chatid or job.userid, not job.chatid)

    def reaches(self, job: StreamJob) -> bool:
        return True

    def send(self, job: StreamJob, message: str, kind: str, patience: float, given_up: bool = False) -> bool:
        handing = partial(self._hand_over, job, message, given_up)
        delivered = bool(best_effort_value(handing, "handing the message to the outbox", delays_for(patience)))
        metrics.WS_SEPARATE.labels(self.bot, kind, "sent" if delivered else "failed").inc()
        logger.info("%s of the answer %s the outbox (aibot_send_msg)", kind, "handed to" if delivered else "NOT in")
        return delivered

    def _hand_over(self, job: StreamJob, markdown: str, given_up: bool) -> bool:
        """Hand `markdown` to the outbox as the rest of `job`'s answer, once: the stream's outbox marker is claimed
        first, so the outbox's own pass never also sends its rest. Each try of one attempt claims as the same
        claimant and makes the same message (`rest.<stream id>`), so a try whose writes were applied but whose
        reply was lost is repeated without a second message. Of a stream a poll gave up (`given_up`), what the
        outbox's pass sends under that marker is the note that it was given up, not the answer: the rest is made
        all the same (the message's own id keeps it to one).

        Raises:
            redis.RedisError: Redis did not answer (the caller tries again while it may).
        """
        claimed = self.outbox.claim(job.stream_id, f"{self.owner} {job.attempt}")
        if not claimed and not given_up:
            logger.info("the outbox sends this answer's rest already")
            return True
        message_id = f"rest.{job.stream_id}"
        if not self.outbox.posted(message_id):  # not made by an earlier try
            fields = {"msgid": f"rest:{job.stream_id}", "userid": job.userid, "chatid": job.chatid}
            fields["rest_of"] = job.stream_id  # part of that message's answer (and of its audit row)
            fields["aibotid"] = job.aibotid
            self.outbox.post(message_id, self.owner, markdown, job.chatid or job.userid, not job.chatid, fields)
        if claimed:
            self.outbox.sent(job.stream_id)
        return True

    def answer_separately(self, job: StreamJob, message: str) -> None:
        return None  # the outbox's pass sends a separate stream's answer when it ends (opened_separately)

    def bubble_lost(self, job: StreamJob) -> bool:
        return False  # the holder saw its frames go out

    def start(self, look: Callable[[str], Snapshot | None]) -> None:
        return None  # the holder and the consumer are started with the bot (Gateway.start)

    def stop_watching(self) -> None:
        return None  # the holder and the consumer are stopped with the bot (Bot.hand_over)

    def close(self) -> None:
        return None


def _answered_on(message: Inbound) -> tuple[str, int, str, bool]:
    """The req_id, connection generation and chat a message is answered on, and whether the chat is 1:1."""
    return message.ws_req_id, message.ws_generation, message.chatid or message.userid, not message.chatid
