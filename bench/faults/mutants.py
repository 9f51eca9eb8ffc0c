"""Deliberately broken builds of the gateway, so that the fault campaign shows it can fail: `python -m bench.faults
--mutant NAME` serves every replica from `create_app(NAME)`, which breaks one promise of the gateway in its own
process (a monkeypatch: the production code has no switch for it) and then builds the app as usual. A campaign whose
checker counts nothing on a mutant would be one that cannot see that promise broken (tests/test_fault_campaign.py
runs a short campaign on each and requires a count).

- `dedup_off`: a msgid is never recognised as one already taken, so WeCom's retry of a message (on another replica,
  or because the reply was slow) opens a second stream, answered on its own (duplicate_deliveries: the answer
  reaches the user twice; extra_dify_calls where Dify's second call is told apart).
- `poll_delta`: a poll shows the newest piece of the answer instead of the text so far, as a gateway that kept
  only its last delta would (withdrawn: a bubble shows less than it showed before).
- `finish_id_off`: a finish carries no finish id, so a try whose reply was lost (Redis paused past the client's
  timeout runs the first try when it resumes) is answered as if another replica had ended the stream: the rest of an
  answer longer than its bubble is never sent, nor its user's open-bubble slot freed (lost: the user never sees the
  whole answer, and no note says why). The watch that makes a rest its finisher never wrote down (for an owner that
  died right after the end) would make that rest half a minute late, so this build has it off too: what is tested
  is that the checker sees a rest never sent.
- `record_after_send`: a long connection's frame is recorded as what its bubble shows only after it went out, by a
  recorder a second behind (the poll records nothing), so a holder that dies in that second leaves the next holder
  to take the bubble for showing less than it did and send again what it showed (duplicate_deliveries).
- `forgive_all`: the checker excuses every problem of a message a fault touched, and counts no note spurious (a
  checker that explains everything away), over a build that ends one question in two with a Dify failure note
  without asking Dify: only the control group, where no fault ran, is left to catch it (control_failures). One in two,
  not fewer: a control phase of a short run holds about a dozen questions, and one in four left all twelve whole in
  3 % of runs (a fresh-clone CI met it).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from collections.abc import Callable

from flask import Flask

from bench.faults.answers import SENTENCE


def _dedup_off() -> None:
    from services.streams.store import StreamStore

    StreamStore.claim_msgid = lambda self, msgid, stream_id: stream_id  # every try claims the msgid afresh


def _poll_delta() -> None:
    from services.streams import service

    showing = service.stream_reply

    def newest_piece(stream_id: str, content: str, finish: bool = False, **fields) -> dict:
        if not finish:
            sentences = SENTENCE.findall(content)
            content = content[content.rfind("〔") :] if len(sentences) > 1 else content  # the last sentence only
        return showing(stream_id, content, finish=finish, **fields)

    service.stream_reply = newest_piece


def _finish_id_off() -> None:
    from services.callback.delivery import CallbackDelivery
    from services.streams.store import StreamStore

    finishing = StreamStore.finish

    def without_finish_id(self, *args, finish_id: str = "", **kwargs):
        return finishing(self, *args, **kwargs)

    StreamStore.finish = without_finish_id
    CallbackDelivery._rest_unmade = lambda self, stream_id: None  # no rest is made for a finisher


RECORD_LAG = 1.0  # seconds from a frame handed to the socket to its record (record_after_send)


def _record_after_send() -> None:
    from services.longconn.outbox import sending_record
    from services.longconn.replies import ReplyPump
    from services.streams.service import StreamService

    framing = StreamService.frame
    StreamService.frame = lambda self, stream_id, record: framing(self, stream_id, None)  # the poll records nothing
    sending = ReplyPump.send

    def send_then_record(self, req_id: str, reply: dict, shows: int, session=None, token: str = "") -> bool:
        went_out = sending(self, req_id, reply, shows, session)  # recorded by nothing: no token
        entry = self._replies.get(req_id)
        if went_out and entry is not None:
            final = bool((reply.get("stream") or {}).get("finish"))
            record = {entry.stream_id: sending_record(shows, final, secrets.token_hex(6))}
            threading.Timer(RECORD_LAG, _record_quietly, args=(self.ledger, record)).start()
        return went_out

    ReplyPump.send = send_then_record


def _record_quietly(ledger, record: dict) -> None:
    try:
        ledger.record(record)
    except Exception as exc:  # noqa: BLE001 - a record the mutant lost is one more way it is broken
        logging.getLogger(__name__).warning("the mutant's late record failed: %s", type(exc).__name__)


def _notes_at_random() -> None:
    from services.backends.dify.answering import DifyBackend
    from services.transport.errors import BackendHTTPError

    asking = DifyBackend._ask

    def sometimes_not(self, turn, request, recorder) -> None:
        if int(hashlib.sha256(request.query.encode()).hexdigest(), 16) % 2 == 0:
            raise BackendHTTPError(500, "internal_server_error", "not asked (the forgive_all mutant)")
        asking(self, turn, request, recorder)

    DifyBackend._ask = sometimes_not


MUTANTS: dict[str, Callable[[], None]] = {
    "dedup_off": _dedup_off,
    "poll_delta": _poll_delta,
    "finish_id_off": _finish_id_off,
    "record_after_send": _record_after_send,
    "forgive_all": _notes_at_random,
}
# Mutants of the checker: it forgives (checker.check(forgive=True)) what it would count.
FORGIVING = frozenset({"forgive_all"})
# What a short run of a mutant adds to its campaign's arguments so that the nemesis reaches the mutant's window within
# it (the whole nemesis reaches it too, in a longer run): for the msgid's dedup, WeCom's retries of one message in two
# (at one in seven, a fresh-clone CI's 44 messages met none the checker told from a restart); a control phase early
# in for the checker's mutant; for a finish whose reply was lost, lost replies of Redis's finish script alone, half of
# them while the fault runs, over callback answers all longer than a bubble (with half of every command's replies
# lost, the rest of the answer often failed before its finish, and a 90-second run missed the window about once in
# ten, a fresh-clone CI among them).
AIM: dict[str, list[str]] = {
    "dedup_off": ["--retry-share", "0.5"],
    "forgive_all": ["--calm-every", "20"],
    "finish_id_off": [
        *("--faults", "redis_replies_lost", "--replies-lost-of", "FINISH"),
        *("--long-share", "1.0", "--replies-lost", "0.5"),
    ],
    "record_after_send": ["--faults", "holder_kill", "--bots", "ws"],
}


def create_app(name: str) -> Flask:
    """The gateway's app with mutant `name` applied (gunicorn: `bench.faults.mutants:create_app('dedup_off')`)."""
    MUTANTS[name]()
    from app import create_app as gateway_app

    return gateway_app()
