"""Routes (docs/configuration.md, "Routes"): one bot whose commands, groups and users reach different backends.

The bots file's routes and their problems (config/bots.py), choosing a route (services/chat/routes.py), and one
bot served on a real port with real Redis, the Dify stand-in playing two apps and the OpenAI-compatible stand-in:
each rule, the conversations kept apart, /new, /routes, no_route_reply, the stream record's and the metrics'
route, and the CLI. Through gunicorn replicas: tests/e2e/test_routes_e2e.py."""

import json
import time

import pytest

from config.bots import BUILT_IN_COMMANDS, load_bots
from config.settings import BotSettings, RouteSettings, SettingsError, load_settings
from demo import dify_standin as d
from demo.wecom_simulator import WeComSimulator
from services.chat.queries import COMMANDS, parse_command
from services.chat.routes import OWN, Choice, RouteTable
from services.streams.record import F
from services.texts import CATALOGUE
from tests.conftest import AES_KEY, DIFY_KEY, OPENAI_KEY, OPENAI_MODEL, TOKEN, wait_until
from tests.test_forms import approval, ask_and_click

HR_KEY, IT_KEY, TEAM_CHAT = "app-hr-routed", "app-it-routed", "wrkTeamChat01"
DEPLOYMENT = {"REDIS_URL": "redis://redis:6379/0", "DIFY_BASE_URL": "https://dify.example/v1", "AUTH_MODE": "none"}
BOT = f"""
[bots.assistant]
token = "{TOKEN}"
encoding_aes_key = "{AES_KEY}"
dify_api_key = "{DIFY_KEY}"
"""


def route(name: str, **keys) -> str:
    lines = [f'name = "{name}"'] + [f"{key} = {_toml(value)}" for key, value in keys.items()]
    return "\n[[bots.assistant.routes]]\n" + "\n".join(lines) + "\n"


def _toml(value) -> str:
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return f'"{value}"'


def bots_from(tmp_path, text: str):
    path = tmp_path / "bots.toml"
    path.write_text(text)
    return load_bots(load_settings({**DEPLOYMENT, "BOTS_FILE": str(path)}, env_files=()))


def problems_of(tmp_path, text: str) -> list[str]:
    with pytest.raises(SettingsError) as error:
        bots_from(tmp_path, text)
    return error.value.problems


# --- the bots file -------------------------------------------------------------------------------------------------


def test_a_route_takes_its_backend_keys_and_inherits_the_rest_from_its_bot(tmp_path):
    text = BOT + 'bot_language = "en"\nshow_reasoning = true\n'
    text += route("hr", command="/HR", dify_api_key=HR_KEY)
    text += route("gpt", users=["bob"], chats=[TEAM_CHAT], backend="openai", openai_base_url="http://m/v1",
                  openai_model="m")  # fmt: skip
    (bot,) = bots_from(tmp_path, text)
    hr, gpt = bot.routes
    assert (hr.name, hr.command, hr.chats, hr.users) == ("hr", "/hr", (), ())
    assert hr.settings.dify.api_key == HR_KEY and bot.dify.api_key == DIFY_KEY
    assert hr.settings.language == "en" and hr.settings.dify.show_reasoning  # the bot's, not given by the route
    assert hr.settings.name == "assistant"
    assert (gpt.users, gpt.chats) == (("bob",), (TEAM_CHAT,))
    assert (gpt.settings.backend, gpt.settings.openai.model) == ("openai", "m")
    assert HR_KEY in bot.secrets()  # the log redactor hides a route's keys too


def test_a_route_reads_a_secret_from_a_file_beside_the_bots_file(tmp_path):
    (tmp_path / "hr-key").write_text(HR_KEY + "\n")
    (bot,) = bots_from(tmp_path, BOT + route("hr", command="/hr", dify_api_key_file="hr-key"))
    assert bot.routes[0].settings.dify.api_key == HR_KEY
    assert repr(HR_KEY) not in repr(bot)


BAD_ROUTES = [
    pytest.param(route("hr", command="/hr", colour="blue"), "route hr: unknown key 'colour'", id="unknown-key"),
    pytest.param(route("hr", command="/hr", group_conversation="shared"), "route hr: unknown key", id="bot-key"),
    pytest.param(route("hr"), "route hr: a route needs at least one of command, chats and users", id="no-condition"),
    pytest.param(route("hr", command="/hr") + route("hr", command="/it"), "route hr: name is another", id="twice"),
    pytest.param(route("hr", command="/hr", backend="carrier"), "route hr: backend must be one of", id="bad-backend"),
    pytest.param(
        route("gpt", users=["bob"], backend="openai", openai_model="m"), "route gpt: openai_base_url must be", id="half"
    ),
    pytest.param(route("hr", command="/new"), "route hr: command /new is the gateway's own", id="built-in"),
    pytest.param(route("hr", command="hr"), "route hr: command must be one word beginning with /", id="no-slash"),
    pytest.param(route("hr", chats="wrk1"), "route hr: chats must be a list of ids", id="chats-not-a-list"),
    pytest.param(route("HR", command="/hr"), "route HR: name must be 1 to 32 of", id="bad-name"),
    pytest.param('\n[[bots.assistant.routes]]\ncommand = "/hr"\n', "route #1: name must be", id="no-name"),
]


@pytest.mark.parametrize(("text", "line"), BAD_ROUTES)
def test_a_bad_route_is_one_line_naming_bot_route_and_key(tmp_path, text, line):
    problems = problems_of(tmp_path, BOT + text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"BOTS_FILE bots.assistant {line}"), problems


def test_the_built_in_commands_no_route_may_take_are_the_gateways():
    assert set(COMMANDS) == BUILT_IN_COMMANDS


def test_a_changed_route_is_a_changed_bot(tmp_path):
    """Live changes (services/gateway.py) rebuild a bot whose settings differ: its routes are among them."""
    (before,) = bots_from(tmp_path, BOT + route("hr", command="/hr"))
    (after,) = bots_from(tmp_path, BOT + route("hr", command="/people"))
    (same,) = bots_from(tmp_path, BOT + route("hr", command="/hr"))
    assert before != after and before == same


# --- choosing ------------------------------------------------------------------------------------------------------


def table(*routes: RouteSettings) -> RouteTable:
    return RouteTable(routes)


def r(name: str, command: str = "", chats: tuple = (), users: tuple = ()) -> RouteSettings:
    return RouteSettings(name, BotSettings(), command, chats, users)


def test_a_command_is_a_whole_word_at_the_start_and_is_taken_off():
    routes = table(r("hr", "/hr"))
    assert routes.choose("/hr how many days off?", "u").route == "hr"
    assert routes.choose("/hr how many days off?", "u").question == "how many days off?"
    assert routes.choose("/HR\nleave", "u").question == "leave"
    assert routes.choose("/hr", "u").question == ""
    assert routes.choose("/hrx leave", "u").route == OWN
    assert routes.choose("ask /hr later", "u").route == OWN
    assert routes.choose("ask /hr later", "u").question == "ask /hr later"


def test_a_chinese_keyboards_solidus_and_spaces_begin_and_end_a_command_as_ascii_ones_do():
    routes = table(r("hr", "/hr"))
    assert routes.choose("／hr　年假还剩几天？", "u") == routes.choose("/hr 年假还剩几天？", "u")
    assert routes.choose("／hr　年假还剩几天？", "u").question == "年假还剩几天？"
    assert parse_command("／停止") == ("stop", "")
    assert parse_command("/新对话　换个话题") == ("new", "换个话题")
    assert parse_command("/NEW\nhello") == ("new", "hello")
    assert parse_command("／ 停止") is None and parse_command("请 /stop") is None


def test_chats_users_and_both_and_the_first_match_wins():
    routes = table(
        r("both", chats=(TEAM_CHAT,), users=("bob",)),
        r("team", chats=(TEAM_CHAT,)),
        r("bob", users=("bob",)),
        r("hr", "/hr"),
    )
    assert routes.choose("hi", "bob", TEAM_CHAT).route == "both"
    assert routes.choose("hi", "alice", TEAM_CHAT).route == "team"
    assert routes.choose("hi", "bob").route == "bob"
    assert routes.choose("/hr hi", "bob").route == "bob"  # first match: bob's route takes all bob says
    assert routes.choose("/hr hi", "bob").question == "/hr hi"  # (a route without a command keeps the text)
    assert routes.choose("/hr hi", "alice").route == "hr"
    assert routes.choose("hi", "alice").route == OWN
    assert routes.choose("hi", "alice", "wrkOther").why == "no route takes it"
    why = "route both: the chat is one of its chats and the user is one of its users"
    assert routes.choose("hi", "bob", TEAM_CHAT).why == why


def test_the_commands_open_to_a_user_are_those_that_would_take_them():
    routes = table(r("team", chats=(TEAM_CHAT,)), r("hr", "/hr", users=("alice",)), r("it", "/it"))
    assert [x.name for x in routes.open_to("alice")] == ["hr", "it"]
    assert [x.name for x in routes.open_to("bob")] == ["it"]
    assert [x.name for x in routes.open_to("alice", TEAM_CHAT)] == []  # the team's route takes everything there


def test_choosing_agrees_with_trying_each_route_in_turn():
    """The index (bit sets) against the plain reading of the rule, over many routes and messages."""
    import random

    rng = random.Random(7)
    users, chats, commands = [f"u{i}" for i in range(8)], ["", *(f"c{i}" for i in range(5))], ["", "/a", "/b", "/c"]
    routes = []
    for i in range(60):
        command = rng.choice(commands)
        chosen = tuple(rng.sample(chats[1:], rng.randint(0, 2)))
        people = tuple(rng.sample(users, rng.randint(0, 2)))
        if command or chosen or people:
            routes.append(r(f"r{i}", command, chosen, people))
    index = RouteTable(tuple(routes))
    for _ in range(2000):
        command, user, chat = rng.choice(commands), rng.choice(users), rng.choice(chats)
        text = f"{command} question".strip()
        plain = next(
            (
                x.name
                for x in routes
                if (not x.command or x.command == command) and (not x.chats or chat in x.chats)
                and (not x.users or user in x.users)
            ),
            OWN,
        )  # fmt: skip
        assert index.choose(text, user, chat).route == plain


# --- one bot served, with its routes -------------------------------------------------------------------------------


@pytest.fixture
def routed(tmp_path, make_app, serve, dify, openai):
    """Bot `assistant`: its own Dify app (DIFY_KEY), `/hr` to a second Dify app, bob to the OpenAI-compatible
    stand-in, the team chat to a third Dify app."""
    dify.app_types.update({HR_KEY: "chat", IT_KEY: "chat"})
    text = BOT + route("hr", command="/hr", dify_api_key=HR_KEY)
    text += route("gpt", users=["bob"], backend="openai", openai_base_url=openai.base_url,
                  openai_api_key=OPENAI_KEY, openai_model=OPENAI_MODEL)  # fmt: skip
    text += route("team", chats=[TEAM_CHAT], dify_api_key=IT_KEY)
    path = tmp_path / "bots.toml"
    path.write_text(text)
    live = serve(make_app(bots_file=str(path), bot_name=""))
    sim = WeComSimulator(live.url, TOKEN, AES_KEY, callback_path="/wecom/callback/assistant", poll_interval=0.05)
    yield live, sim
    sim.close()
    for key in (HR_KEY, IT_KEY):
        dify.app_types.pop(key, None)


def asked_with(dify) -> list[tuple[str, str, str]]:
    """(the app's key, the query, the conversation id) of each chat call Dify got."""
    return [
        (r["headers"].get("authorization", "").removeprefix("Bearer "), r["body"]["query"],
         r["body"].get("conversation_id", ""))
        for r in dify.requests
        if "query" in r["body"]
    ]  # fmt: skip


def test_each_rule_reaches_its_backend(routed, dify, openai, redis_client):
    live, sim = routed
    dify.script(d.answer("from hr"))
    hr = sim.ask("/hr how many days off?")
    assert hr.text == "from hr"
    dify.script(d.answer("from the team's app"))
    assert sim.ask("deploy?", chatid=TEAM_CHAT).text == "from the team's app"
    dify.script(d.answer("from the bot's own"))
    assert sim.ask("anything else").text == "from the bot's own"
    assert [(key, query) for key, query, _ in asked_with(dify)] == [
        (HR_KEY, "how many days off?"),
        (IT_KEY, "deploy?"),
        (DIFY_KEY, "anything else"),
    ]
    assert sim.ask("hello from bob", userid="bob").finished
    assert openai.requests[-1]["body"]["messages"][-1]["content"] == "hello from bob"
    meta = redis_client.hgetall(f"bot:assistant:dify_stream:{{{hr.stream_id}}}")
    assert (meta[F.route], meta[F.backend], meta[F.query]) == ("hr", "dify", "how many days off?")


def test_each_route_keeps_its_own_conversations_and_new_starts_them_all_over(routed, dify):
    live, sim = routed
    for question in ("own one", "/hr hr one", "own two", "/hr hr two"):
        dify.script(d.answer("ok"))
        assert sim.ask(question).text == "ok"
    (own1, own_c1), (hr1, hr_c1), (own2, own_c2), (hr2, hr_c2) = [(q, c) for _, q, c in asked_with(dify)]
    assert own_c1 == "" and hr_c1 == ""  # a route's first question starts its own conversation
    assert own_c2 and hr_c2 and own_c2 != hr_c2
    assert sim.ask("/new").text
    for question in ("own three", "/hr hr three"):
        dify.script(d.answer("ok"))
        sim.ask(question)
    assert [c for _, _, c in asked_with(dify)[-2:]] == ["", ""]


def test_routes_tells_the_asker_the_commands_and_where_this_chat_goes(routed, dify, openai):
    live, sim = routed
    said = sim.ask("/routes").text
    assert "/hr" in said and "hr" in said
    assert sim.ask("/routes", chatid=TEAM_CHAT).text.endswith("「team」回答。")
    assert dify.requests == [] and openai.requests == []  # no backend asked


def test_metrics_carry_the_route(routed, dify):
    live, sim = routed

    def counted() -> dict[str, float]:
        text = live.app.test_client().get("/metrics").get_data(as_text=True)
        wanted = ('dify_calls_total{backend="dify",bot="assistant",kind="new",route="hr"}',
                  'dify_calls_total{backend="dify",bot="assistant",kind="new",route=""}',
                  'stream_duration_seconds_count{bot="assistant",route="hr"}')  # fmt: skip
        lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith(wanted))
        return {name: float(lines.get(name, 0)) for name in wanted}

    before = counted()
    dify.script(d.answer("ok"))
    sim.ask("/hr counted")
    after = counted()
    assert [after[name] - before[name] for name in before] == [1, 0, 1]
    text = live.app.test_client().get("/metrics").get_data(as_text=True)
    assert 'dify_errors_total{backend="dify",bot="assistant",code="timeout",route=""} 0.0' in text


def test_a_message_no_route_takes_gets_the_no_route_reply(tmp_path, make_app, serve, dify):
    dify.app_types[HR_KEY] = "chat"
    path = tmp_path / "bots.toml"
    path.write_text(BOT + 'no_route_reply = "Ask with /hr."\n' + route("hr", command="/hr", dify_api_key=HR_KEY))
    live = serve(make_app(bots_file=str(path), bot_name=""))
    sim = WeComSimulator(live.url, TOKEN, AES_KEY, callback_path="/wecom/callback/assistant", poll_interval=0.05)
    try:
        assert sim.ask("hello?").text == "Ask with /hr."
        assert sim.ask("/help").text != "Ask with /hr."  # the built-in commands never meet it
        assert "/hr" in sim.ask("/routes").text
        dify.script(d.answer("hr here"))
        assert sim.ask("/hr hello").text == "hr here"
        assert [key for key, _, _ in asked_with(dify)] == [HR_KEY]
    finally:
        sim.close()
        dify.app_types.pop(HR_KEY, None)


def test_the_cli_lists_the_routes_and_says_which_a_message_takes(routed):
    live, _ = routed
    runner = live.app.test_cli_runner()
    listed = runner.invoke(args=["bots", "routes"]).output.splitlines()
    assert listed[0].split() == ["BOT", "ROUTE", "COMMAND", "CHATS", "USERS", "BACKEND", "AT"]
    assert [line.split()[1] for line in listed[1:]] == ["hr", "gpt", "team", "(own)"]
    which = runner.invoke(args=["bots", "which", "--bot", "assistant", "--user", "alice", "--text", "/hr leave?"])
    assert which.exit_code == 0 and which.output.startswith("route hr: the command /hr; answered by dify")
    which = runner.invoke(args=["bots", "which", "--bot", "assistant", "--user", "alice", "--text", "hi"])
    assert which.output.startswith("no route takes it: the bot's own backend, dify")
    checked = runner.invoke(args=["bots", "check"])
    assert checked.exit_code == 0, checked.output
    assert [line.split(":")[0] for line in checked.output.splitlines()] == [
        "assistant", "assistant route hr", "assistant route gpt", "assistant route team"
    ]  # fmt: skip


def test_a_route_removed_while_its_answer_streams_lets_it_finish(tmp_path, make_app, serve, dify):
    """Live changes rebuild the bot; its old copy finishes the answers it was giving, on the route's app."""
    dify.app_types[HR_KEY] = "chat"
    path = tmp_path / "bots.toml"
    path.write_text(BOT + route("hr", command="/hr", dify_api_key=HR_KEY))
    live = serve(make_app(bots_file=str(path), bot_name=""))
    sim = WeComSimulator(live.url, TOKEN, AES_KEY, callback_path="/wecom/callback/assistant", poll_interval=0.05)
    try:
        words = [f"w{i} " for i in range(20)]
        dify.script([step for word in words for step in (d.message(word), d.sleep(0.05))] + [d.end()])
        first = sim.send(sim.text_message("/hr a long answer, please"))
        path.write_text(BOT)  # the route is gone while its answer streams
        assert live.gateway.watch.check() == "ok"
        assert sim.follow(first).text == "".join(words)
        dify.script(d.answer("the bot's own"))
        assert sim.ask("/hr now?").text == "the bot's own"  # no route takes it now: the command stays in the question
        assert asked_with(dify)[-1][:2] == (DIFY_KEY, "/hr now?")
    finally:
        sim.close()
        dify.app_types.pop(HR_KEY, None)


def posted_with(dify, path_part: str) -> list[str]:
    """The API keys of Dify's POSTs whose path holds `path_part`."""
    return [key for method, path, key in dify.keyed if method == "POST" and path_part in path]


def test_a_routed_answers_form_feedback_and_stop_reach_its_routes_app(routed, dify):
    """A form's tap, 👍/👎 and /stop belong to their answer: they reach the app of the route that answered."""
    live, sim = routed
    dify.app_types[HR_KEY] = "advanced-chat"
    dify.script(approval())
    conversation, reply, _ = ask_and_click(sim, sim, question="/hr buy laptops")
    assert reply["response_type"] == "update_template_card" and conversation.finished
    assert posted_with(dify, "/form/human_input/") == [HR_KEY]

    dify.app_types[HR_KEY] = "chat"
    dify.script(d.answer("rate me"))
    rated = sim.ask("/hr rate this")
    assert sim.send(sim.event_message("feedback_event", {"id": rated.stream_id, "type": 1})) is None
    assert wait_until(lambda: posted_with(dify, "/feedbacks") == [HR_KEY])

    dify.script([d.message("a long"), d.sleep(5), d.end()])
    first = sim.send(sim.text_message("/hr a long one"))
    assert wait_until(lambda: len([k for k in posted_with(dify, "/chat-messages") if k == HR_KEY]) == 3)
    time.sleep(0.3)  # Dify has named the task
    assert sim.ask("/stop").text == CATALOGUE["zh"]["stop_done"]
    assert sim.follow(first).finished
    assert wait_until(lambda: posted_with(dify, "/stop") == [HR_KEY])


def test_a_bots_routes_share_its_quota_and_every_routed_log_line_names_the_route(
    tmp_path, make_app, serve, dify, capsys
):
    dify.app_types[HR_KEY] = "chat"
    path = tmp_path / "bots.toml"
    path.write_text(BOT + "quota_user_messages_per_day = 2\n" + route("hr", command="/hr", dify_api_key=HR_KEY))
    live = serve(make_app(bots_file=str(path), bot_name="", log_format="json"))
    sim = WeComSimulator(live.url, TOKEN, AES_KEY, callback_path="/wecom/callback/assistant", poll_interval=0.05)
    try:
        dify.script(d.answer("own"))
        assert sim.ask("one").text == "own"
        dify.script(d.answer("hr"))
        routed = sim.ask("/hr two")
        assert routed.text == "hr"
        assert "2" in sim.ask("/hr three").text  # the day's two questions, over the bot's routes together
        assert len(asked_with(dify)) == 2
    finally:
        sim.close()
        dify.app_types.pop(HR_KEY, None)
    live.gateway.runner.drain(5)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    answering = [entry for entry in lines if entry.get("stream") == routed.stream_id and entry.get("backend")]
    assert answering and {entry.get("route") for entry in answering} == {"hr"}


def test_the_files_of_a_routes_dify_may_be_fetched_and_no_other_hosts(tmp_path):
    """A bot's file fetcher reads its own Dify's files and its routes' Difys' (their answers' files), and nothing
    else (a URL in an answer must never make the gateway fetch from anywhere)."""
    from services.bot_build import _route_difys
    from services.files.fetch import FileFetcher

    text = BOT + 'dify_base_url = "http://dify.internal/v1"\n'
    text += route("it", chats=[TEAM_CHAT], dify_base_url="http://dify-it.internal/v1", dify_api_key=IT_KEY)
    text += route("gpt", users=["bob"], backend="openai", openai_base_url="http://model.internal/v1", openai_model="m")
    (bot,) = bots_from(tmp_path, text)
    fetcher = FileFetcher(bot.dify.base_url, bot.dify.files_url, also=_route_difys(bot))
    try:
        assert fetcher.allowed == {"http://dify.internal", "http://dify-it.internal"}
    finally:
        fetcher.close()


def test_an_answer_whose_route_is_gone_ends_with_a_clear_note(routed, dify, monkeypatch):
    """A takeover (or a form's rest) on a copy of the bot that no longer has the answer's route: a finished bubble
    saying so, no backend asked."""
    live, sim = routed
    table = live.gateway.bots["assistant"].callback.intake.routing.table
    monkeypatch.setattr(table, "choose", lambda text, userid, chatid="": Choice("gone", text, "a route since removed"))
    conversation = sim.ask("anyone?")
    assert conversation.finished and conversation.text == CATALOGUE["zh"]["route_gone"]
    assert dify.requests == []


def test_a_route_answers_within_its_own_limits(tmp_path, make_app, serve, dify):
    """A route's DIFY_MAX_STREAM_SECONDS is its own: its answers stop at it, the bot's own answers do not."""
    dify.app_types[HR_KEY] = "chat"
    path = tmp_path / "bots.toml"
    path.write_text(BOT + route("hr", command="/hr", dify_api_key=HR_KEY, dify_max_stream_seconds=1))
    live = serve(make_app(bots_file=str(path), bot_name=""))
    sim = WeComSimulator(live.url, TOKEN, AES_KEY, callback_path="/wecom/callback/assistant", poll_interval=0.05)
    try:
        slow = [d.message("slow "), d.sleep(2.5), d.message("end"), d.end()]
        dify.script(slow)
        cut = sim.ask("/hr take your time")
        assert cut.finished and CATALOGUE["zh"]["timeout"] in cut.text and "end" not in cut.text
        dify.script(slow)
        assert sim.ask("take your time").text == "slow end"
    finally:
        sim.close()
        dify.app_types.pop(HR_KEY, None)
