"""The operator's page, /admin, over HTTP: two replicas on the test Redis recording to the test MariaDB. Sign-in with
ADMIN_TOKEN and a name (a session one replica made works on the other; failed sign-ins counted per address across
replicas: 429 after five a minute; a cookie from before a token change refused), a change without its CSRF token
changes nothing, the live answers of both replicas with Stop (as /stop: the stopped note in the bubble, Dify's stop
once), the audit search and its CSV (the rows `audit export` gives for the same filter), quotas and their reset;
every sign-in and change an audit row of kind admin. The same page in Chromium: tests/e2e/test_admin_e2e.py."""

from __future__ import annotations

import re
import time
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from config.settings import SettingsError
from demo import dify_standin as d
from services.admin.session import COOKIE, FAILS_PER_MINUTE, AdminSessions
from services.texts import CATALOGUE
from tests import test_audit
from tests.conftest import KEYS, WS_BOT_ID, WS_BOT_SECRET, make_simulator, wait_until
from tests.test_audit import count, rows

ZH = CATALOGUE["zh"]
TOKEN = "admin-token-for-the-tests-0123456789"
PUSH_TOKEN = "push-token-for-the-admin-tests-0123"
audit_url, engine = test_audit.audit_url, test_audit.engine  # the audit database's fixtures
LONG_ANSWER = [d.message("part one"), d.sleep(0.3), d.message(" part two"), d.sleep(8), d.message(" never"), d.end()]


@pytest.fixture
def admin_pair(make_pair, engine, audit_url):
    return make_pair(database_url=audit_url, admin_token=TOKEN, quota_user_messages_per_day=1)


def sign_in(url: str, name: str = "ops-anna", token: str = TOKEN) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=10)
    reply = client.post("/admin/sign-in", data={"name": name, "token": token})
    assert reply.status_code == 303, reply.text
    return client


def csrf(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def admin_rows(engine) -> list[dict]:
    return rows(engine, kind="admin")


def test_without_an_admin_token_there_is_no_page(make_app, serve):
    replica = serve(make_app())
    for path in ("/admin/", "/admin/live", "/admin/audit.csv"):
        assert httpx.get(replica.url + path, timeout=5).status_code == 404
    assert httpx.post(replica.url + "/admin/sign-in", data={"token": TOKEN}, timeout=5).status_code == 404


def test_a_short_admin_token_is_one_line_at_start_up(settings):
    with pytest.raises(SettingsError) as raised:
        settings.replace(admin_token="too-short")
    assert [p for p in raised.value.problems if "ADMIN_TOKEN" in p] == [
        "ADMIN_TOKEN must be at least 16 characters (or empty: no operator's page)"
    ]


def test_a_session_made_on_one_replica_works_on_the_other_and_is_a_row(admin_pair, engine):
    a, b = admin_pair
    page = httpx.get(a.url + "/admin/", timeout=5)
    assert page.status_code == 200 and 'name="token"' in page.text  # the sign-in form
    client = httpx.Client(base_url=a.url, timeout=10)
    reply = client.post("/admin/sign-in", data={"name": "ops-anna", "token": TOKEN})
    cookie = reply.headers["set-cookie"]
    assert reply.status_code == 303
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/admin", "Max-Age=28800"):
        assert attribute in cookie
    assert "Secure" not in cookie  # plain http here; under https (X-Forwarded-Proto) it is
    other = httpx.get(b.url + "/admin/", cookies={COOKIE: client.cookies[COOKIE]}, timeout=5)
    assert other.status_code == 200 and "ops-anna" in other.text and "Long connection held by" in other.text
    assert other.headers["content-security-policy"].startswith("default-src 'self'")
    [row] = admin_rows(engine)
    assert (row["userid"], row["question"], row["outcome"]) == ("ops-anna", "sign_in", "done")
    assert TOKEN not in (row["answer"] or "")


def test_failed_sign_ins_are_counted_across_replicas_then_refused(admin_pair, engine, redis_client):
    a, b = admin_pair
    for attempt in range(FAILS_PER_MINUTE):
        replica = (a, b)[attempt % 2]
        reply = httpx.post(replica.url + "/admin/sign-in", data={"name": "mallory", "token": "guess"}, timeout=5)
        assert reply.status_code == 401 and COOKIE not in reply.headers.get("set-cookie", "")
    refused = httpx.post(a.url + "/admin/sign-in", data={"name": "anna", "token": TOKEN}, timeout=5)
    assert refused.status_code == 429 and COOKIE not in refused.headers.get("set-cookie", "")
    assert [r["outcome"] for r in admin_rows(engine)] == ["refused"] * FAILS_PER_MINUTE
    for key in redis_client.scan_iter(match=KEYS.admin_fails("*")):
        redis_client.delete(key)  # the next test's sign-ins come from the same address


def test_failed_sign_ins_are_counted_over_a_sliding_minute_not_a_calendar_one(redis_client):
    """Four failures in the last second of a minute and one in the first of the next are five in a minute: the
    next is refused (a count per calendar minute let ten through across its edge, and made the test above fail
    when its sign-ins crossed one). A minute after the fifth, none is left to refuse."""
    sessions, edge = AdminSessions(TOKEN, redis_client, KEYS), 1_800_000_000.0  # (a whole minute)
    for moment in (edge - 0.8, edge - 0.6, edge - 0.4, edge - 0.2):
        sessions.failed("192.0.2.7", now=moment)
    assert not sessions.refused("192.0.2.7", now=edge - 0.1)
    sessions.failed("192.0.2.7", now=edge + 0.1)
    assert sessions.refused("192.0.2.7", now=edge + 0.2) and sessions.refused("192.0.2.7", now=edge + 59.1)
    assert not sessions.refused("192.0.2.7", now=edge + 60.2)
    redis_client.delete(KEYS.admin_fails("192.0.2.7"))


def test_a_cookie_made_before_a_token_change_is_refused(admin_pair, make_app, serve, audit_url):
    a, _ = admin_pair
    client = sign_in(a.url)
    changed = serve(make_app(database_url=audit_url, admin_token="a-new-admin-token-9876543210"))
    page = httpx.get(changed.url + "/admin/live", cookies={COOKIE: client.cookies[COOKIE]}, timeout=5)
    assert page.status_code == 303 and page.headers["location"] == "/admin/"
    # and a cookie of the right shape, signed with anything else, or expired, is nobody
    sessions = AdminSessions(TOKEN, None, KEYS)
    assert sessions.read(client.cookies[COOKIE]).name == "ops-anna"
    assert sessions.read(client.cookies[COOKIE][:-2] + "xx") is None
    assert sessions.read(sessions.issue("anna", now=time.time() - 8 * 3600 - 1)) is None


def test_a_change_without_its_csrf_token_changes_nothing(admin_pair, engine, dify):
    a, b = admin_pair
    dify.script(d.answer("answered"), times=None)
    sim = make_simulator(a.url)
    sim.follow(sim.send(sim.text_message("first question")))
    assert sim.follow(sim.send(sim.text_message("second question"))).text.startswith("你今天的 1 次提问已用完")
    client = sign_in(b.url)
    for form in ({"scope": "user", "who": "alice"}, {"scope": "user", "who": "alice", "csrf": "forged"}):
        assert client.post("/admin/quotas/reset", data=form).status_code == 403
    assert (
        httpx.post(b.url + "/admin/quotas/reset", data={"scope": "user", "who": "alice"}, timeout=5).status_code == 403
    )
    page = client.get("/admin/quotas", params={"scope": "user", "who": "alice"})
    assert re.search(r"<td>default</td><td>1</td><td>1</td>", page.text)
    assert [r["question"] for r in admin_rows(engine)] == ["sign_in"]
    # with it, the count is gone and the next question is answered
    reset = client.post("/admin/quotas/reset", data={"scope": "user", "who": "alice", "csrf": csrf(page.text)})
    assert reset.status_code == 303
    assert "<td>default</td><td>0</td><td>1</td>" in client.get("/admin/quotas?scope=user&who=alice").text
    assert sim.follow(sim.send(sim.text_message("third question"))).text == "answered"
    assert [(r["question"], r["answer"]) for r in admin_rows(engine)][1:] == [("quota_reset", "user alice")]
    sim.close()


def test_an_answer_on_one_replica_is_live_on_the_other_and_stopped_from_there(admin_pair, dify, engine, redis_client):
    a, b = admin_pair
    dify.script(LONG_ANSWER)
    sim = make_simulator(a.url)
    reply = sim.send(sim.text_message("tell me a long story"))
    stream_id = reply["stream"]["id"]
    said = lambda: "".join(redis_client.lrange(KEYS.stream_chunks(stream_id), 0, -1))  # noqa: E731
    assert wait_until(lambda: said() == "part one part two")
    client = sign_in(b.url)
    assert wait_until(lambda: f'data-stream="{stream_id}"' in client.get("/admin/live?fragment=1").text, timeout=5)
    live = client.get("/admin/live").text
    assert "alice" in live and "replica-a" in live and "streaming" in live
    stopped = client.post("/admin/live/stop", data={"bot": "default", "stream": stream_id, "csrf": csrf(live)})
    assert stopped.status_code == 303
    conversation = sim.follow(reply)
    assert conversation.text == f"part one part two\n\n{ZH['stopped_note']}"
    assert wait_until(lambda: len(dify.stops) == 1, timeout=5)
    assert "No answer in flight" in client.get("/admin/live?fragment=1").text
    assert redis_client.zcard(KEYS.live_answers()) == 0
    assert wait_until(lambda: [r["question"] for r in admin_rows(engine)] == ["sign_in", "stop"], timeout=5)
    assert admin_rows(engine)[1]["answer"] == f"default/{stream_id}"
    time.sleep(0.5)
    assert len(dify.stops) == 1
    sim.close()


def test_the_audit_search_and_its_csv_say_what_audit_export_says(make_pair, engine, audit_url, dify, monkeypatch):
    a, b = make_pair(database_url=audit_url, admin_token=TOKEN)
    dify.script(d.answer("noted"), times=None)
    sims = [make_simulator(a.url), make_simulator(b.url)]
    for number, sim in enumerate(sims * 2):
        sim.follow(sim.send(sim.text_message(f"question {number} about {'laptops' if number % 2 else 'chairs'}")))
    assert wait_until(lambda: count(engine) == 4, timeout=10)
    client = sign_in(a.url)
    search = {"text": "laptops", "outcome": "answered", "bot": "default"}
    page = client.get("/admin/audit", params=search).text
    assert page.count("about laptops") == 2 and "about chairs" not in page
    row_id = re.search(r'href="/admin/audit/(\d+)"', page).group(1)
    detail = client.get(f"/admin/audit/{row_id}").text
    assert "question 3 about laptops" in detail and "dify_conversation_id" in detail
    downloaded = client.get("/admin/audit.csv", params=search)
    assert downloaded.headers["content-disposition"].startswith("attachment")
    exported = a.app.test_cli_runner().invoke(
        args=["audit", "export", "--format", "csv", "--text", "laptops", "--outcome", "answered", "--bot", "default"]
    )
    assert exported.exit_code == 0 and downloaded.text == exported.output
    assert len(downloaded.text.strip().splitlines()) == 3  # the header and two rows
    assert client.get("/admin/audit", params={"since": "yesterday"}).text.count("is not a time") == 1
    # without a user or a chat, a text is looked for in the newest TEXT_MOST_ROWS rows of the range, and said so;
    # the CSV link carries that range
    monkeypatch.setattr("web.admin.TEXT_MOST_ROWS", 2)
    bounded = client.get("/admin/audit", params={"text": "laptops"}).text
    assert "question 3 about laptops" in bounded and "newest 2 rows of the range" in bounded
    link = re.search(r'href="(/admin/audit.csv\?[^"]+)"', bounded).group(1).replace("&amp;", "&")
    applied = dict(parse_qsl(urlsplit(link).query))
    assert applied.keys() == {"text", "since", "until"}
    same = ["audit", "export", "--format", "csv", "--text", "laptops"]
    same += ["--since", applied["since"], "--until", applied["until"]]
    assert client.get(link).text == a.app.test_cli_runner().invoke(args=same).output
    assert client.get("/admin/audit", params={"text": "laptops", "user": "alice"}).text.count("about laptops") == 2
    for sim in sims:
        sim.close()


def test_the_latest_pushes_with_their_status_and_no_view_without_the_push_api(make_pair, wecom_ws, engine, audit_url):
    wecom = wecom_ws({WS_BOT_ID: WS_BOT_SECRET})
    connection = {"wecom_bot_id": WS_BOT_ID, "wecom_bot_secret": WS_BOT_SECRET, "wecom_ws_url": wecom.url}
    a, b = make_pair(
        wecom_mode="long_connection", push_api_token=PUSH_TOKEN, admin_token=TOKEN, database_url=audit_url, **connection
    )
    assert wait_until(lambda: wecom.subscribed(WS_BOT_ID) == 1, timeout=10)
    body = {"bot": "default", "userid": "bob", "markdown": "**Reminder**: review at 3 pm"}
    headers = {"Authorization": f"Bearer {PUSH_TOKEN}"}
    assert httpx.post(f"{a.url}/api/push", json=body, headers=headers, timeout=5).status_code == 202
    assert wait_until(lambda: len(rows(engine, kind="push")) == 1, timeout=10)
    client = sign_in(b.url)
    assert wait_until(lambda: "<td>sent" in client.get("/admin/pushes").text, timeout=10)
    page = client.get("/admin/pushes").text
    assert "bob" in page and "**Reminder**: review at 3 pm" in page and 'href="/admin/pushes"' in page
    # a deployment without the push API has no such view, nor a link to it
    c, _ = make_pair(database_url=audit_url, admin_token=TOKEN)
    other = sign_in(c.url)
    assert other.get("/admin/pushes").status_code == 404 and "/admin/pushes" not in other.get("/admin/").text
