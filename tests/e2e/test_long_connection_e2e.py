"""Long-connection mode as in production: three gunicorn replicas (two workers each) share the test Redis; the
WeCom long-connection stand-in plays the server. Exactly one process holds the bot's connection; the others take
over when it is killed or drained; a foreign subscriber does not start a kick loop."""

import base64
import os
import signal
import time

import httpx
import pytest
from sqlalchemy import select

from demo import dify_apps as apps
from demo import dify_standin as d
from demo.replicas import GunicornReplica
from services.audit.table import wecom_audit
from services.auth import db
from services.texts import CATALOGUE
from services.wecom.crypto import media_cipher, pad32
from tests.conftest import PNG, outbox_settled, wait_until
from tests.e2e.conftest import replica_env

ZH = CATALOGUE["zh"]

pytestmark = pytest.mark.e2e
BOT_ID, SECRET = "lc-bot-1", "lc-secret-1"
LEASE_SECONDS = 3


@pytest.fixture
def wecom(wecom_ws):
    return wecom_ws({BOT_ID: SECRET})


@pytest.fixture
def replicas(dify, wecom, redis_url, redis_client, tmp_path):
    started = []

    def start(count: int = 3, **settings: str) -> list[GunicornReplica]:
        mode = {
            "WECOM_MODE": "long_connection",
            "WECOM_BOT_ID": BOT_ID,
            "WECOM_BOT_SECRET": SECRET,
            "WECOM_WS_URL": wecom.url,
            "WECOM_WS_LEASE_SECONDS": str(LEASE_SECONDS),
            "WELCOME_MESSAGE": "Hello from the long connection",
            "GUNICORN_GRACEFUL_TIMEOUT": "10",
        }
        env = replica_env(dify.base_url, redis_url, **{**mode, **settings})
        for i in range(count):
            started.append(GunicornReplica(env, tmp_path, f"replica-{i}", workers=2).start())
        return started

    yield start
    for replica in started:
        replica.stop()


def holder_replica(replicas, redis_client) -> GunicornReplica:
    value = redis_client.get(f"wecom_ws:{{{BOT_ID}}}:lease") or ""
    holder = value.rpartition(" ")[0].split(":")[0]
    return next(r for r in replicas if r.name == holder)


def connected(replica) -> float:
    text = httpx.get(f"{replica.url}/metrics", timeout=5).text
    lines = [line for line in text.splitlines() if line.startswith('wecom_ws_connected{bot="default"}')]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def sample_subscribers(wecom, seconds: float) -> set[int]:
    seen = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.add(wecom.subscribed(BOT_ID))
        time.sleep(0.02)
    return seen


def test_one_process_holds_the_connection_and_answers_stream(replicas, wecom, dify):
    replicas_started = replicas()
    assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=10)
    assert sample_subscribers(wecom, 3) == {1}
    assert len(wecom.subscribes) == 1  # nobody else subscribed: the six workers stand by
    assert sum(connected(r) for r in replicas_started) == 1  # wecom_ws_connected, over all processes
    ready = httpx.get(f"{replicas_started[0].url}/readyz", timeout=5).json()
    assert ready["bots"]["default"]["connection"] == "holding"

    dify.script(d.answer("An answer that streams over the WebSocket.", pieces=8, delay=0.1))
    req_id = wecom.deliver_text(BOT_ID, "hello over ws")
    final = wecom.final(req_id)
    assert final is not None
    assert final["stream"]["content"] == "An answer that streams over the WebSocket."
    contents = [frame["stream"]["content"] for frame in wecom.frames(req_id)]
    assert len(contents) >= 2
    shown = contents[1:]  # the first frame is the placeholder
    assert all(later.startswith(earlier) for earlier, later in zip(shown, shown[1:], strict=False))
    assert [frame["stream"]["finish"] for frame in wecom.frames(req_id)].count(True) == 1


def test_a_redelivered_message_is_answered_once_and_audited_once(replicas, wecom, dify, mysql_databases):
    database_url = mysql_databases("long_connection_audit")
    replicas(count=2, DATABASE_URL=database_url)  # AUDIT is on wherever there is a database
    assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=10)
    dify.script(d.answer("once", delay=0.05))
    first = wecom.deliver_text(BOT_ID, "twice?", msgid="m-redelivered")
    second = wecom.deliver_text(BOT_ID, "twice?", msgid="m-redelivered")
    assert wecom.final(first)["stream"]["content"] == "once"
    assert wecom.final(second)["stream"]["content"] == "once"
    assert len(dify.chat_requests()) == 1
    engine = db.make_engine(database_url)

    def rows() -> list:
        with engine.connect() as connection:
            return list(connection.execute(select(wecom_audit.c.msgid, wecom_audit.c.answer)))

    assert wait_until(lambda: rows() == [("m-redelivered", "once")], timeout=15)
    time.sleep(2)  # every process's sweep has run again meanwhile
    assert rows() == [("m-redelivered", "once")]
    engine.dispose()


def test_a_killed_holder_is_replaced_within_the_lease(replicas, wecom, redis_client):
    started = replicas()
    assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=10)
    holder = holder_replica(started, redis_client)
    holder.kill()
    killed = time.monotonic()
    assert wait_until(lambda: len(wecom.subscribes) == 2, timeout=15)
    assert wecom.subscribes[1][1] - killed <= LEASE_SECONDS + 2
    assert sample_subscribers(wecom, 2) == {1}


def test_a_drained_holder_hands_over_at_once(replicas, wecom, redis_client):
    started = replicas()
    assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=10)
    holder = holder_replica(started, redis_client)
    holder.signal(signal.SIGTERM)
    drained = time.monotonic()
    assert wait_until(lambda: len(wecom.subscribes) == 2, timeout=10)
    assert wecom.subscribes[1][1] - drained <= 3
    assert sample_subscribers(wecom, 2) == {1}


def test_a_foreign_subscriber_does_not_start_a_kick_loop(replicas, wecom, redis_client):
    started = replicas(count=2)
    assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=10)
    wecom.kick(BOT_ID)
    time.sleep(LEASE_SECONDS * 3)
    assert len(wecom.subscribes) == 1  # cooling down, not reconnecting
    assert redis_client.ttl(f"wecom_ws:{{{BOT_ID}}}:cooldown") > 250  # every process of ours, for 300 s
    logs = "\n".join(r.logs() for r in started)
    assert "not one of ours" in logs


def test_a_wrong_secret_backs_the_whole_deployment_off(replicas, wecom):
    """Two replicas of two workers with a wrong secret: one subscription attempt per back-off interval for the whole
    deployment (kept in Redis), not one per process, with one ERROR line per attempt and every replica's /readyz
    saying bad_credentials."""
    started = replicas(count=2, WECOM_BOT_SECRET="wrong")
    assert wait_until(lambda: len(wecom.refused) >= 1, timeout=10)
    first = time.monotonic()
    time.sleep(30)
    assert wecom.subscribes == []
    assert 1 <= len(wecom.refused) <= 2, f"{len(wecom.refused)} subscription attempts in 30 s"
    assert wecom.connections <= 2, f"{wecom.connections} sockets opened"
    errors = sum(r.logs().count("check its bot_id and secret") for r in started)
    assert errors == len(wecom.refused)  # one ERROR line per attempt, which is one per interval
    for replica in started:
        ready = httpx.get(f"{replica.url}/readyz", timeout=5)
        assert ready.status_code == 200  # the replicas themselves stay ready (other bots may be fine)
        assert ready.json()["bots"]["default"]["connection"] == "bad_credentials"
    assert time.monotonic() - first >= 30


def test_the_welcome_goes_out_within_five_seconds(replicas, wecom):
    replicas(count=1)
    assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=10)
    req_id = wecom.deliver_event(BOT_ID, "enter_chat")
    assert wait_until(lambda: wecom.welcome(req_id) is not None, timeout=5)
    assert wecom.welcome(req_id)["text"]["content"] == "Hello from the long connection"


def test_a_stream_whose_window_passed_gets_its_rest_once_through_send_msg(replicas, wecom, dify, redis_client):
    replicas(count=2)
    assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=10)
    wecom.window_seconds = 0.8
    dify.script([d.message("slow "), d.sleep(2), d.message("answer, all of it"), d.end()])
    req_id = wecom.deliver_text(BOT_ID, "slow one", userid="bob")
    assert wait_until(lambda: wecom.proactive, timeout=15)
    assert outbox_settled(redis_client, BOT_ID)  # nothing more comes
    (sent,) = wecom.proactive
    assert sent["chatid"] == "bob"
    assert sent["markdown"]["content"].rstrip().endswith("answer, all of it")
    assert not [f for f in wecom.frames(req_id) if f["stream"]["finish"]]


def test_a_killed_holders_answer_is_completed_once_through_send_msg(replicas, wecom, dify, redis_client):
    """The new holder cannot use the dead connection's req_id: the chatflow answer goes on on another replica and
    its rest reaches the user once, as a proactive message."""
    dify.mode = "advanced-chat"
    started = replicas(DIFY_APP_TYPE="advanced-chat")
    assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=10)
    words = [f"part{i} " for i in range(30)]
    steps = [apps.workflow_started()]
    for word in words:
        steps += [d.message(word), d.sleep(0.15)]
    dify.script([*steps, apps.workflow_done({"answer": "".join(words)}), d.end()])
    req_id = wecom.deliver_text(BOT_ID, "a long one", userid="carol")
    assert wait_until(lambda: any("part3" in f["stream"]["content"] for f in wecom.frames(req_id)), timeout=10)
    holder_replica(started, redis_client).kill()
    assert wait_until(lambda: len(wecom.subscribes) == 2, timeout=15)
    assert wait_until(lambda: wecom.proactive, timeout=30)
    assert outbox_settled(redis_client, BOT_ID, timeout=30)  # and never a second time
    (sent,) = wecom.proactive
    assert sent["chatid"] == "carol"
    rest = sent["markdown"]["content"]
    assert rest.rstrip().endswith("part29")
    # Only what the bubble did not show: WeCom keeps the dead req_id's bubble on screen, so the rest begins where it
    # stopped (its last frame, which may not have been shown yet: a one-piece seam at most), under its header.
    shown = wecom.frames(req_id)[-1]["stream"]["content"]
    last = max(i for i, word in enumerate(words) if word.strip() in shown.split())
    assert rest.startswith(ZH["continued"])
    assert not [word for word in words[:last] if word.strip() in rest.split()], (shown, rest)


def test_answers_run_on_every_replica_not_only_the_holders(replicas, wecom, dify, redis_client):
    started = replicas()
    assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=10)
    dify.script(d.answer("spread out", delay=0.3), match="spread", times=None)
    req_ids = [wecom.deliver_text(BOT_ID, f"spread {i}", userid=f"user{i}") for i in range(12)]
    finals = [wecom.final(req_id) for req_id in req_ids]
    assert [f["stream"]["content"] for f in finals] == ["spread out"] * 12
    owners = {redis_client.hget(f"dify_stream:{{{f['stream']['id']}}}", "owner").split(":")[0] for f in finals}
    assert len(owners) >= 2  # the holder queued them; consumers on other replicas ran them
    assert holder_replica(started, redis_client).name in {r.name for r in started}


def test_an_image_arrives_decrypted_with_its_own_aeskey(replicas, wecom, dify):
    replicas(count=1)
    assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=10)
    aeskey = base64.b64encode(os.urandom(32)).decode().rstrip("=")
    encryptor = media_cipher(aeskey).encryptor()
    url = dify.server.url + dify.host_file(encryptor.update(pad32(PNG)) + encryptor.finalize())
    dify.script(d.answer("a nice picture"))
    req_id = wecom.deliver_image(BOT_ID, url, aeskey)
    assert wecom.final(req_id)["stream"]["content"] == "a nice picture"
    (upload,) = dify.uploads.values()
    assert upload["data"] == PNG


def test_forms_waiting_on_other_replicas_are_answered_by_taps_on_the_holder(replicas, wecom, dify, redis_client):
    started = replicas()
    assert wait_until(lambda: wecom.subscribed(BOT_ID) == 1, timeout=10)
    rest = [d.message(" Approved."), apps.workflow_done({"answer": " Approved."}), d.end()]
    approval = [apps.workflow_started(), d.message("Need approval."), apps.form(branches={"*": rest})]
    dify.script(approval, match="approve", times=None)
    messages = [wecom.deliver_text(BOT_ID, f"approve {i}", userid=f"user{i}") for i in range(8)]
    assert wait_until(lambda: all(wecom.cards(m) for m in messages), timeout=20)
    streams = [wecom.frames(m)[0]["stream"]["id"] for m in messages]
    owners = {redis_client.hget(f"dify_stream:{{{s}}}", "owner").split(":")[0] for s in streams}
    assert len(owners) >= 2  # the forms wait on several replicas; every tap arrives at the holder
    for number, message in enumerate(messages):
        click = wecom.deliver_card_click(BOT_ID, wecom.cards(message)[0], "approve", userid=f"user{number}")
        assert wecom.updated(click)["template_card"]["main_title"]["desc"].endswith("Approve")
    finals = [wecom.final(m, timeout=20) for m in messages]
    assert [f["stream"]["content"] for f in finals] == ["Need approval. Approved."] * 8
    assert len(dify.form_submissions) == 8 and holder_replica(started, redis_client) in started
