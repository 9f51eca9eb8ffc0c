"""Routes as in production: two gunicorn replicas (two workers each) on one BOTS_FILE, the test Redis and the real
MariaDB (the audit trail on), Dify played by two stand-ins (the bot's own app and `/hr`'s on one, the team chat's
app on the other) and the OpenAI-compatible stand-in for bob. A callback bot (`assistant`) and a long-connection
bot (`desk`) both have routes; each message's polls go to both replicas."""

import subprocess
import sys
import time

import pytest
from sqlalchemy import select

from config.settings import PROJECT_ROOT
from demo import dify_standin as d
from demo.replicas import GunicornReplica
from demo.wecom_simulator import WeComSimulator
from services.audit.table import wecom_audit
from services.auth import db
from tests.conftest import AES_KEY, DIFY_KEY, OPENAI_KEY, OPENAI_MODEL, TOKEN, wait_until
from tests.e2e.conftest import callback_bot, connection_bot, replica_env

pytestmark = pytest.mark.e2e
WORKERS = 4
HR_KEY, TEAM_KEY, TEAM_CHAT = "app-hr-e2e", "app-team-e2e", "wrkTeamE2E"
DESK_ID, DESK_SECRET = "lc-routed", "lc-routed-secret"


def bots_file(dify: str, team_dify: str, openai: str, ws_url: str, hr_command: str = "/hr", extra: str = "") -> str:
    return f"""
{callback_bot("assistant", dify)}
[[bots.assistant.routes]]
name = "hr"
command = "{hr_command}"
dify_api_key = "{HR_KEY}"

[[bots.assistant.routes]]
name = "bob-in-team"
chats = ["{TEAM_CHAT}"]
users = ["bob"]
backend = "openai"
openai_base_url = "{openai}"
openai_api_key = "{OPENAI_KEY}"
openai_model = "{OPENAI_MODEL}"

[[bots.assistant.routes]]
name = "team"
chats = ["{TEAM_CHAT}"]
dify_base_url = "{team_dify}"
dify_api_key = "{TEAM_KEY}"
{extra}
{connection_bot("desk", DESK_ID, DESK_SECRET, ws_url, dify)}
[[bots.desk.routes]]
name = "hr"
command = "/hr"
dify_api_key = "{HR_KEY}"
"""


@pytest.fixture
def team_dify(another_dify):
    return another_dify(TEAM_KEY)


@pytest.fixture
def deployment(tmp_path, dify, team_dify, openai, wecom_ws, redis_url, redis_client, mysql_databases):
    """(replicas, the bots file, a function writing it anew, the audit database's URL, the WebSocket stand-in)."""
    dify.app_types[HR_KEY] = "chat"
    wecom = wecom_ws({DESK_ID: DESK_SECRET})
    path = tmp_path / "bots.toml"

    def write(**changes) -> None:
        path.write_text(bots_file(dify.base_url, team_dify.base_url, openai.base_url, wecom.url, **changes))

    write()
    database_url = mysql_databases("routes_e2e")
    env = replica_env(dify.base_url, redis_url, BOTS_FILE=str(path), DATABASE_URL=database_url)
    replicas = [GunicornReplica(env, tmp_path, f"replica-{i}", workers=2).start() for i in range(2)]
    assert wait_until(lambda: said(replicas, "gateway ready") >= WORKERS, timeout=60)
    yield replicas, write, database_url, wecom
    for replica in replicas:
        replica.stop()
    dify.app_types.pop(HR_KEY, None)


@pytest.fixture
def sim(deployment):
    replicas = deployment[0]
    urls = [replica.url for replica in replicas]
    simulator = WeComSimulator(urls, TOKEN, AES_KEY, callback_path="/wecom/callback/assistant", poll_interval=0.05)
    yield simulator
    simulator.close()


def ask(sim: WeComSimulator, text: str, msgid: str, userid: str = "alice", chatid: str = ""):
    """Send a text message under `msgid` and follow its stream to the end."""
    first = sim.send(sim.text_message(text, userid, chatid, msgid=msgid))
    return sim.follow(first, userid, chatid)


def said(replicas, words: str) -> int:
    return sum(replica.logs().count(words) for replica in replicas)


def keys_asked(dify) -> list[tuple[str, str]]:
    return [
        (r["headers"].get("authorization", "").removeprefix("Bearer "), r["body"]["query"])
        for r in dify.requests
        if "query" in r["body"]
    ]


def audit_routes(database_url: str) -> dict[str, tuple[str, str]]:
    """msgid -> (route, backend) of every audit row."""
    engine = db.make_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(wecom_audit.c.msgid, wecom_audit.c.route, wecom_audit.c.backend))
            return {msgid: (route, backend) for msgid, route, backend in rows}
    finally:
        engine.dispose()


def test_each_route_answers_through_the_replicas_and_the_audit_names_it(deployment, sim, dify, team_dify, openai):
    replicas, _, database_url, _ = deployment
    dify.script(d.answer("hr answers", delay=0.02))
    hr = ask(sim, "/hr how many days off?", "m-hr")
    team_dify.script(d.answer("team answers", delay=0.02))
    team = ask(sim, "is the build green?", "m-team", chatid=TEAM_CHAT)
    bob = ask(sim, "summarise the thread", "m-bob-team", userid="bob", chatid=TEAM_CHAT)  # both conditions hold
    dify.script(d.answer("own answers", delay=0.02))
    bob_alone = ask(sim, "and outside the team?", "m-bob", userid="bob")
    routes = sim.ask("/routes", chatid=TEAM_CHAT)

    assert (hr.text, team.text, bob_alone.text) == ("hr answers", "team answers", "own answers")
    assert bob.finished and openai.requests[-1]["body"]["messages"][-1]["content"] == "summarise the thread"
    assert keys_asked(dify) == [(HR_KEY, "how many days off?"), (DIFY_KEY, "and outside the team?")]
    assert keys_asked(team_dify) == [(TEAM_KEY, "is the build green?")]
    assert "/hr" in routes.text and "「team」" in routes.text
    wanted = {"m-hr": ("hr", "dify"), "m-team": ("team", "dify"), "m-bob-team": ("bob-in-team", "openai"),
              "m-bob": ("", "dify")}  # fmt: skip
    assert wait_until(lambda: wanted.items() <= audit_routes(database_url).items(), timeout=15)


def test_a_long_connection_bots_route_answers_over_the_websocket(deployment, dify):
    _, _, database_url, wecom = deployment
    assert wait_until(lambda: wecom.subscribed(DESK_ID) == 1, timeout=15)
    dify.script(d.answer("hr over the connection", delay=0.02))
    req_id = wecom.deliver_text(DESK_ID, "/hr my payslip", msgid="m-desk-hr")
    assert wecom.final(req_id)["stream"]["content"] == "hr over the connection"
    assert keys_asked(dify) == [(HR_KEY, "my payslip")]
    assert wait_until(lambda: audit_routes(database_url).get("m-desk-hr") == ("hr", "dify"), timeout=15)


def test_a_changed_route_takes_the_next_message_on_every_worker_and_a_bad_one_changes_nothing(deployment, sim, dify):
    replicas, write, _, _ = deployment
    write(hr_command="/people")
    assert wait_until(lambda: said(replicas, "BOTS_FILE reloaded") >= WORKERS, timeout=30)
    for n in range(6):  # new messages land on either replica's either worker
        dify.script(d.answer(f"people {n}", delay=0.01))
        assert sim.ask(f"/people question {n}").text == f"people {n}"
    assert {key for key, _ in keys_asked(dify)} == {HR_KEY}
    assert [query for _, query in keys_asked(dify)] == [f"question {n}" for n in range(6)]

    write(hr_command="/people", extra='\n[[bots.assistant.routes]]\nname = "nothing"\n')
    line = "BOTS_FILE bots.assistant route nothing: a route needs at least one of command, chats and users"
    assert wait_until(lambda: said(replicas, line) >= WORKERS, timeout=30)
    dify.script(d.answer("still people", delay=0.01))
    assert sim.ask("/people still?").text == "still people"
    assert keys_asked(dify)[-1] == (HR_KEY, "still?")


def test_a_bad_route_at_start_up_is_one_line_naming_bot_route_and_key(tmp_path, redis_url, dify):
    path = tmp_path / "bots.toml"
    bad = bots_file(dify.base_url, dify.base_url, dify.base_url, "ws://127.0.0.1:9", extra='colour = "blue"\n')
    path.write_text(bad)
    env = replica_env(dify.base_url, redis_url, BOTS_FILE=str(path))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "bots", "routes"],
        cwd=PROJECT_ROOT,
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "BOTS_FILE bots.assistant route team: unknown key 'colour'" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - started < 60


def test_each_route_keeps_its_conversations_across_replicas_and_new_starts_them_over(deployment, sim, dify):
    for n, question in enumerate(("own one", "/hr hr one", "own two", "/hr hr two")):
        dify.script(d.answer("ok", delay=0.01))
        assert ask(sim, question, f"m-conv-{n}").text == "ok"
    calls = [(r["headers"].get("authorization", "").removeprefix("Bearer "), r["body"]) for r in dify.requests]
    (own1, hr1, own2, hr2) = [(key, body.get("conversation_id", "")) for key, body in calls if "query" in body]
    assert (own1, hr1) == ((DIFY_KEY, ""), (HR_KEY, ""))
    assert own2[1] and hr2[1] and own2[1] != hr2[1]  # each continues its own, whichever replica took the message
    assert ask(sim, "/new", "m-conv-new").finished
    for n, question in enumerate(("own three", "/hr hr three")):
        dify.script(d.answer("ok", delay=0.01))
        ask(sim, question, f"m-conv-after-{n}")
    fresh = [r["body"].get("conversation_id", "") for r in dify.requests if "query" in r["body"]][-2:]
    assert fresh == ["", ""]  # /new started over the asker's conversations of every route in the chat
