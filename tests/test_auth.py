"""Authentication end to end: Redis token cache -> the real MariaDB user table -> the auth API stand-in.

Each outcome is checked in the user's bubble (finished, with the right note) and at Dify (called or not).
"""

import hashlib
import logging
import threading
import time

import orjson
import pytest

from demo import auth_standin
from demo import dify_standin as d
from demo import openai_standin as o
from services.auth import db
from services.auth.authorizer import token_ttl
from services.auth.users import UserDirectory, UserExists
from services.texts import CATALOGUE
from tests.conftest import AES_KEY, AUTH_KEY, DIFY_KEY, KEYS, TOKEN, make_simulator, openai_settings, wait_until

ZH = CATALOGUE["zh"]


@pytest.fixture
def directory(user_table):
    """The user table with alice (enabled) and dave (disabled)."""
    user_table.add("alice", "alice@corp.example", "Alice")
    user_table.add("dave", "dave@corp.example", "Dave", enabled=False)
    return user_table


def external_auth(auth, mysql_url) -> dict:
    """The settings of AUTH_MODE=external against the auth stand-in and the test database, with short timeouts."""
    return dict(
        auth_mode="external",
        auth_api_url=auth.url,
        auth_api_key=AUTH_KEY,
        database_url=mysql_url,
        auth_timeout=1.0,
        database_timeout=1.0,
        auth_token_margin=60,
    )


@pytest.fixture
def auth_app(make_app, mysql_url, auth, directory):
    def build(**changes):
        return make_app(**{**external_auth(auth, mysql_url), **changes})

    return build


@pytest.fixture
def sim(auth_app, serve):
    live = serve(auth_app())
    simulator = make_simulator(live.url)
    simulator.live = live
    yield simulator
    simulator.close()


def finished_with(conversation, note_key):
    assert conversation.finished
    assert conversation.text == ZH[note_key]


def test_a_known_user_gets_a_token_passed_to_dify(sim, dify, auth, redis_client):
    dify.script(d.answer("hello Alice"))
    assert sim.ask("hi", userid="alice").text == "hello Alice"

    [call] = auth.calls
    assert call["authorization"] == f"Bearer {AUTH_KEY}"
    assert call["body"] == {"account": "alice@corp.example", "wecom_userid": "alice"}
    token = redis_client.get("authorization:wechatid:alice")
    assert token.startswith("tok_")
    info = orjson.loads(redis_client.get(KEYS.token_info(token)))
    assert info["account"] == "alice@corp.example"
    assert info["user"]["department"] == "R&D"
    [request] = dify.chat_requests()
    assert request["inputs"] == {"user_token": token, "user_account": "alice@corp.example"}
    # the token is a value (with a TTL), never part of a key name, which SCAN and MONITOR show
    assert not [key for key in redis_client.scan_iter("*") if token in key]
    assert KEYS.token_info(token) == f"authorization:token:{hashlib.sha256(token.encode()).hexdigest()}"


def test_token_ttl_is_expires_in_minus_the_margin(sim, dify, auth, redis_client):
    auth.expires_in = 3600
    dify.script(d.answer("ok"))
    sim.ask("hi", userid="alice")
    token = redis_client.get("authorization:wechatid:alice")
    for key in ("authorization:wechatid:alice", KEYS.token_info(token)):
        assert 3530 <= redis_client.ttl(key) <= 3540


def test_short_lived_tokens_are_cached_for_half_their_life():
    assert token_ttl(3600, 60) == 3540
    assert token_ttl(100, 60) == 50
    assert token_ttl(1, 60) == 1


def test_the_next_message_uses_the_cached_token(sim, dify, auth):
    dify.script(d.answer("ok"), times=None)
    sim.ask("one", userid="alice")
    sim.ask("two", userid="alice")
    assert len(auth.calls) == 1
    tokens = {r["inputs"]["user_token"] for r in dify.chat_requests()}
    assert len(tokens) == 1


def test_unknown_user(sim, dify, auth):
    finished_with(sim.ask("hi", userid="mallory"), "unknown_user")
    assert dify.chat_requests() == []
    assert auth.calls == []


def test_disabled_user(sim, dify, auth):
    finished_with(sim.ask("hi", userid="dave"), "user_disabled")
    assert dify.chat_requests() == []
    assert auth.calls == []


def test_a_bot_on_an_openai_server_lets_in_the_same_users(auth_app, serve, openai, auth):
    """The user table and the auth API gate a bot whose answers come from an OpenAI-compatible server too (it
    declares no inputs, so nothing beyond the token is asked for)."""
    live = serve(auth_app(**openai_settings(openai)))
    sim = make_simulator(live.url)
    try:
        openai.script(o.answer("Hello Alice."))
        assert sim.ask("hi", userid="alice").text == "Hello Alice."
        finished_with(sim.ask("hi", userid="mallory"), "unknown_user")
        assert len(openai.completions()) == 1 and len(auth.calls) == 1
    finally:
        sim.close()


@pytest.mark.parametrize("status", [401, 403, 404])
def test_refused_by_the_auth_api(sim, dify, auth, redis_client, status):
    auth.refuse("alice@corp.example", status)
    finished_with(sim.ask("hi", userid="alice"), "auth_refused")
    assert dify.chat_requests() == []
    assert not redis_client.exists("authorization:wechatid:alice")


@pytest.mark.parametrize("mode", [auth_standin.DOWN, auth_standin.SLOW, auth_standin.MALFORMED, auth_standin.NO_TOKEN])
def test_auth_api_unavailable(sim, dify, auth, mode):
    auth.mode = mode
    finished_with(sim.ask("hi", userid="alice"), "auth_unavailable")
    assert dify.chat_requests() == []


def test_auth_api_unreachable(auth_app, serve, dify):
    live = serve(auth_app(auth_api_url="http://127.0.0.1:9/auth/token"))
    simulator = make_simulator(live.url)
    finished_with(simulator.ask("hi", userid="alice"), "auth_unavailable")
    assert dify.chat_requests() == []
    simulator.close()


def test_database_down(auth_app, serve, dify, auth):
    live = serve(auth_app(database_url="mysql+pymysql://root@127.0.0.1:1/nowhere"))
    simulator = make_simulator(live.url)
    finished_with(simulator.ask("hi", userid="alice"), "database_unavailable")
    assert dify.chat_requests() == []
    assert auth.calls == []
    simulator.close()


def seed_token(redis_client, userid="alice", token="tok_cached_before_the_outage"):
    info = {"userid": userid, "account": f"{userid}@corp.example", "display_name": "Alice", "user": {}}
    redis_client.set(f"authorization:wechatid:{userid}", token, ex=600)
    redis_client.set(KEYS.token_info(token), orjson.dumps(info), ex=600)
    return token


def test_cached_users_keep_working_while_the_database_is_down(auth_app, serve, dify, auth, redis_client):
    token = seed_token(redis_client)
    live = serve(auth_app(database_url="mysql+pymysql://root@127.0.0.1:1/nowhere"))
    simulator = make_simulator(live.url)
    dify.script(d.answer("still here"))
    assert simulator.ask("hi", userid="alice").text == "still here"
    assert dify.chat_requests()[0]["inputs"]["user_token"] == token
    simulator.close()


def test_cached_users_keep_working_while_the_auth_api_is_down(sim, dify, auth, redis_client):
    seed_token(redis_client)
    auth.mode = auth_standin.DOWN
    dify.script(d.answer("still here"))
    assert sim.ask("hi", userid="alice").text == "still here"
    assert auth.calls == []


def test_single_flight_across_two_replicas(auth_app, serve, dify, auth):
    """The three messages WeCom lets one user have in flight, arriving at once on two replicas: one auth call."""
    auth.delay = 0.4
    replicas = [serve(auth_app(replica_id="replica-a")), serve(auth_app(replica_id="replica-b"))]
    simulator = make_simulator([r.url for r in replicas])
    dify.script(d.answer("answered"), times=None)
    results = []
    barrier = threading.Barrier(3)

    def ask(i):
        barrier.wait()
        results.append(simulator.ask(f"question {i}", userid="alice"))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [c.text for c in results] == ["answered"] * 3
    assert len(auth.calls) == 1
    assert len({r["inputs"]["user_token"] for r in dify.chat_requests()}) == 1
    simulator.close()


def test_single_flight_under_many_concurrent_lookups(auth_app, auth):
    """Twenty concurrent lookups of one user on two app instances (e.g. several bots): one auth call."""
    auth.delay = 0.3
    authorizers = [auth_app(replica_id=f"replica-{i}").extensions["gateway"].bot().authorizer for i in range(2)]
    results, errors = [], []
    barrier = threading.Barrier(20)

    def lookup(i):
        barrier.wait()
        try:
            results.append(authorizers[i % 2].inputs_for("alice")["user_token"])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=lookup, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 20
    assert len(set(results)) == 1
    assert len(auth.calls) == 1


def test_a_request_that_takes_the_flight_just_after_the_leader_finished_does_not_ask_again(auth_app, auth):
    """The race behind single flight: a waiter misses the cache, then the leader caches its token and lets go of
    the flight, then the waiter takes the flight. It must use the leader's token, not ask for a second one."""
    authorizer = auth_app().extensions["gateway"].bot().authorizer
    first = authorizer.inputs_for("alice")["user_token"]
    assert authorizer._exchange_once("alice")[0] == first  # the waiter's path after its cache miss
    assert len(auth.calls) == 1
    assert authorizer.token_status("alice")["flight"] is None


def test_a_leader_whose_lock_ran_out_leaves_the_next_leaders_flight_alone(auth_app, auth, redis_client):
    """A slow exchange outlives its lock and another request leads the user's flight now: the first leader's end
    (success or refusal) must neither delete nor overwrite the second's lock."""
    authorizer = auth_app().extensions["gateway"].bot().authorizer
    flight = KEYS.auth_flight("alice")
    auth.delay = 0.5
    done = threading.Event()
    threading.Thread(target=lambda: (authorizer.inputs_for("alice"), done.set()), daemon=True).start()
    assert wait_until(lambda: (redis_client.get(flight) or "").startswith("running "))
    redis_client.set(flight, "running next-leader", px=10_000)  # the lock ran out; another leader took it
    assert done.wait(10)
    assert redis_client.get(flight) == "running next-leader"
    assert redis_client.pttl(flight) > 5_000


def test_a_burst_from_a_refused_user_asks_once(sim, dify, auth):
    auth.refuse("alice@corp.example", 403)
    auth.delay = 0.3
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(sim.ask(f"q{i}", userid="alice"))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(c.text == ZH["auth_refused"] for c in results)
    assert len(auth.calls) == 1


def test_declared_inputs_are_filled_from_the_user_info(sim, dify, auth):
    dify.parameters["user_input_form"] = [
        {"text-input": {"variable": "department", "label": "Dept", "required": False}},
        {"text-input": {"variable": "display_name", "label": "Name", "required": False}},
        {"select": {"variable": "tone", "label": "Tone", "required": True, "default": "formal", "options": []}},
        {"paragraph": {"variable": "not_known", "label": "x", "required": False}},
    ]
    dify.script(d.answer("ok"))
    sim.ask("hi", userid="alice")
    inputs = dify.chat_requests()[0]["inputs"]
    assert inputs["department"] == "R&D"
    assert inputs["display_name"] == "Alice"
    assert inputs["tone"] == "formal"
    assert "not_known" not in inputs
    assert inputs["user_account"] == "alice@corp.example"


def test_auth_mode_none_asks_nobody(make_app, serve, dify, auth):
    live = serve(make_app(auth_mode="none"))
    simulator = make_simulator(live.url)
    dify.script(d.answer("open to all"))
    assert simulator.ask("hi", userid="anyone").text == "open to all"
    assert auth.calls == []
    assert dify.chat_requests()[0]["inputs"] == {}
    simulator.close()


def test_no_token_key_or_secret_in_any_log_line(sim, dify, auth, redis_client, caplog):
    dify.script(d.answer("logged"), times=None)
    with caplog.at_level(logging.DEBUG):
        sim.ask("hi", userid="alice")
        sim.ask("again", userid="alice")
        finished_with(sim.ask("hi", userid="mallory"), "unknown_user")
    token = redis_client.get("authorization:wechatid:alice")
    assert token
    assert caplog.records
    for secret in (token, AUTH_KEY, DIFY_KEY, TOKEN, AES_KEY):
        assert secret not in caplog.text
        assert all(secret not in str(r.args) for r in caplog.records)


def test_readiness_names_the_database(auth_app):
    client = auth_app(database_url="mysql+pymysql://root@127.0.0.1:1/nowhere").test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "database" in response.get_json()["failed"]
    assert auth_app().test_client().get("/readyz").status_code == 200


def test_readiness_fails_until_the_user_table_exists(auth_app, tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    client = auth_app(database_url=url).test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["failed"] == {"database": "no wecom_users table: run `flask --app app db init`"}
    db.init_schema(db.make_engine(url))
    assert client.get("/readyz").status_code == 200


# --- the user directory and the operator commands -----------------------------------------------------------


def test_directory_on_mariadb(directory):
    assert directory.find("alice").enabled
    assert not directory.find("dave").enabled
    assert directory.find("nobody") is None
    with pytest.raises(UserExists):
        directory.add("alice", "other@corp.example")
    assert directory.set_enabled("alice", True)  # unchanged value still counts as found
    assert not directory.set_enabled("nobody", True)
    assert [u.userid for u in directory.list()] == ["alice", "dave"]
    directory.add("张三", "zhangsan@corp.example", "张三")
    assert directory.find("张三").display_name == "张三"


def test_cli_schema_init_is_safe_twice_and_users_can_be_managed(auth_app, dify, auth, redis_client, serve):
    app = auth_app()
    runner = app.test_cli_runner()
    for _ in range(2):
        result = runner.invoke(args=["db", "init"])
        assert result.exit_code == 0
        assert "schema ready" in result.output
    result = runner.invoke(args=["users", "add", "erin", "erin@corp.example", "--name", "Erin"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(args=["users", "add", "erin", "x"]).exit_code != 0
    listing = runner.invoke(args=["users", "list"]).output
    assert "erin@corp.example" in listing
    assert "alice" in listing

    simulator = make_simulator(serve(app).url)
    dify.script(d.answer("welcome Erin"))
    assert simulator.ask("hi", userid="erin").text == "welcome Erin"
    assert redis_client.exists("authorization:wechatid:erin")

    assert runner.invoke(args=["users", "disable", "erin"]).exit_code == 0
    assert not redis_client.exists("authorization:wechatid:erin")  # disabling revokes the cached token
    finished_with(simulator.ask("still allowed?", userid="erin"), "user_disabled")
    assert runner.invoke(args=["users", "enable", "erin"]).exit_code == 0
    dify.script(d.answer("back again"))
    assert simulator.ask("and now?", userid="erin").text == "back again"
    assert runner.invoke(args=["users", "disable", "ghost"]).exit_code != 0
    simulator.close()


def test_reads_go_to_the_read_replica_and_fall_back_to_the_primary(user_table, mysql_databases, caplog):
    replica_url = mysql_databases("replica")
    replica_engine = db.make_engine(replica_url, timeout=2)
    db.init_schema(replica_engine)
    replica = UserDirectory(replica_engine)
    if replica.find("only-on-the-replica") is None:
        replica.add("only-on-the-replica", "r@corp.example")
    users = UserDirectory(user_table.engine, db.make_engine(replica_url, timeout=2))
    assert users.find("only-on-the-replica") is not None  # read from the replica
    users.add("written", "w@corp.example")
    assert user_table.find("written") is not None  # written to the primary
    assert replica.find("written") is None

    down = UserDirectory(user_table.engine, db.make_engine("mysql+pymysql://root@127.0.0.1:1/gone", timeout=1))
    assert down.find("written") is not None  # the replica is down: the primary answers
    assert "read replica unavailable" in caplog.text
    assert [u.userid for u in down.list()] == ["written"]  # and keeps answering without trying the replica again
    assert caplog.text.count("read replica unavailable") == 1
    replica_engine.dispose()


def test_an_app_that_declares_the_wecom_context_gets_it(make_app, serve, dify):
    """wecom_userid, wecom_chatid, wecom_chattype and wecom_bot are filled when the app declares them (whatever
    the auth mode); an app that does not declare them gets none."""
    dify.script(d.answer("ok"), times=None)
    dify.parameters["user_input_form"] = [
        {"text-input": {"variable": name, "label": name, "required": False}}
        for name in ("wecom_userid", "wecom_chatid", "wecom_chattype", "wecom_bot")
    ]
    declaring = make_simulator(serve(make_app(auth_mode="none")).url)
    declaring.ask("@bot in the group", userid="bob", chatid="team-1")
    assert dify.chat_requests()[0]["inputs"] == {
        "wecom_userid": "bob",
        "wecom_chatid": "team-1",
        "wecom_chattype": "group",
        "wecom_bot": "default",
    }
    dify.parameters["user_input_form"] = []
    silent = make_simulator(serve(make_app(auth_mode="none")).url)  # a new process reads the parameters afresh
    silent.ask("plain", userid="bob")
    assert dify.chat_requests()[1]["inputs"] == {}
    declaring.close()
    silent.close()


def test_an_outage_before_the_answer_starts_is_waited_out_while_the_bubble_can_be_answered(
    auth_app, serve, private_redis, dify, auth
):
    """Redis goes away while the user is being authorized (a Sentinel failover takes 20 s and more), for longer than
    a blip's retries: the worker waits for it as long as the bubble could still show an answer, and the user gets
    the whole answer from one Dify call, not a note asking them to send the message again."""
    live = serve(auth_app(redis_url=private_redis.url, redis_socket_timeout=0.5, stream_lease_seconds=5))
    # The auth API answers once Redis is paused (within its 1 s timeout): caching the token and what follows wait.
    auth.delay = 0.6
    dify.script(d.answer("answered after the outage"))
    simulator = make_simulator(live.url, poll_interval=0.2)
    reply = simulator.send(simulator.text_message("hello", userid="alice"))
    time.sleep(0.2)
    private_redis.pause()
    time.sleep(13)  # longer than a blip's retries (services/outage.RETRY_DELAYS with the socket timeouts)
    private_redis.resume()
    conversation = simulator.follow(reply)
    assert conversation.finished
    assert conversation.text == "answered after the outage"
    assert len(dify.chat_requests()) == 1
    simulator.close()


def test_an_auth_api_down_for_seconds_costs_a_wait_and_not_the_answer(auth_app, serve, dify, auth):
    """AUTH_RETRY_SECONDS: a user without a cached token, while the auth API is down, waits (the bubble shows its
    placeholder) and is answered once it is back; an unknown user is still answered at once."""
    live = serve(auth_app(auth_retry_seconds=30))
    simulator = make_simulator(live.url)
    dify.script(d.answer("answered after the wait"))
    auth.mode = auth_standin.DOWN
    sent = simulator.send(simulator.text_message("hi", userid="alice"))
    assert wait_until(lambda: len(auth.calls) >= 1)
    threading.Timer(2.0, auth.reset).start()  # the auth API is back
    assert simulator.follow(sent, userid="alice").text == "answered after the wait"
    assert len(dify.chat_requests()) == 1
    started = time.monotonic()
    finished_with(simulator.ask("hi", userid="mallory"), "unknown_user")  # a refusal waits for nothing
    assert time.monotonic() - started < 5
    simulator.close()


def test_a_routed_question_carries_the_user_details_its_routes_app_declares(auth_app, serve, dify, tmp_path):
    """The user's details go to an app as the inputs it declares: a route's app is given what it declares, not what
    the bot's own app does (routes: docs/configuration.md)."""
    dify.app_types["app-hr-inputs"] = "chat"
    dify.inputs_of["app-hr-inputs"] = [{"text-input": {"variable": "department", "label": "Dept", "required": False}}]
    bots = tmp_path / "bots.toml"
    bots.write_text(
        f'[bots.default]\ncallback_path = "/wecom/callback"\ntoken = "{TOKEN}"\nencoding_aes_key = "{AES_KEY}"\n'
        '[[bots.default.routes]]\nname = "hr"\ncommand = "/hr"\ndify_api_key = "app-hr-inputs"\n'
    )
    live = serve(auth_app(bots_file=str(bots), bot_name=""))
    simulator = make_simulator(live.url)
    try:
        dify.script(d.answer("own"), times=1)
        simulator.ask("the bot's own", userid="alice")
        dify.script(d.answer("hr"), times=1)
        simulator.ask("/hr and hr's", userid="alice")
    finally:
        simulator.close()
        dify.app_types.pop("app-hr-inputs", None)
    own, hr = dify.chat_requests()
    assert "department" not in own["inputs"] and own["inputs"]["user_token"]
    assert hr["inputs"]["department"] == "R&D" and hr["inputs"]["user_token"] == own["inputs"]["user_token"]
