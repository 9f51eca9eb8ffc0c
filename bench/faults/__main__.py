"""Run the fault campaign: for each Redis topology in turn (one server, Sentinel, Cluster, started on loopback),
three gateway replicas under gunicorn (two workers each) serve a chat bot, a chatflow bot, a form bot and a bot
answered by an OpenAI-compatible server in callback mode and a chat bot in long-connection mode, authorizing users
through MariaDB and the auth API stand-in. Users converse
while a seeded nemesis kills, stops and restarts replicas, pauses or kills Redis and restarts MariaDB; then the
checker reads the history and counts what was lost, called twice, shown twice, foreign or stuck (FAULTS.md).

    python -m bench.faults --minutes 3 --topology sentinel --json out.json
    python -m bench.faults --minutes 3 --topology standalone --dify-version 1.16   # Dify played as 1.16.0
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from bench import harness
from bench.faults import proactive
from bench.faults.answers import sentences_in
from bench.faults.checker import COUNTS, check
from bench.faults.history import History
from bench.faults.mutants import FORGIVING, MUTANTS
from bench.faults.nemesis import ALL_FAULTS, Nemesis, data_client
from bench.faults.proxy import FaultyLink, LinkGroup, ServerLinks
from bench.faults.workload import CHAT, CHATFLOW, FORM, OPENAI, Arrivals, Bot, Users, Workload
from config.bots import bot_keys
from demo.auth_standin import AuthStandIn
from demo.dify_standin import DifyStandIn
from demo.mariadb_server import PrivateMariaDB
from demo.openai_standin import OpenAIStandIn
from demo.redis_server import PrivateRedisCluster, PrivateRedisServer, PrivateSentinelSet
from demo.replicas import GunicornReplica
from demo.wecom_api_standin import WeComApiStandIn
from demo.wecom_simulator import WeComSimulator
from demo.wecom_ws_standin import WeComWebSocketStandIn
from services.audit.table import wecom_audit
from services.auth import db
from services.auth.users import UserDirectory
from services.keys import Keys
from services.lua import ScriptSpec
from services.streams import scripts as stream_scripts

TOPOLOGIES = ("standalone", "sentinel", "cluster")
REPLICAS = 3
# (name, callback path, token, EncodingAESKey, Dify API key, its app): the campaign's own, used nowhere else; the
# OPENAI bot's answers come from the OpenAI-compatible server's stand-in (it has no Dify key)
BOTS = (
    ("chat", "/wecom/callback/chat", "faults-chat-token", "FaultsChatKey" + "0123456789" * 3, "app-chat", CHAT),
    ("flow", "/wecom/callback/flow", "faults-flow-token", "FaultsFlowKey" + "0123456789" * 3, "app-flow", CHATFLOW),
    ("form", "/wecom/callback/form", "faults-form-token", "FaultsFormKey" + "0123456789" * 3, "app-form", FORM),
    ("model", "/wecom/callback/model", "faults-model-token", "FaultsModelKe" + "0123456789" * 3, "", OPENAI),
)
MODEL = "faults-model"  # the model the OpenAI-compatible server offers
FLOW_COMMAND, MODEL_COMMAND = "/flow", "/model"  # the chat bot's routes to the chatflow app and to the model
WS_BOT, WS_SECRET = "faults-ws-bot", "faults-ws-secret"
AUTH_KEY = "faults-auth-key"
# How long no Dify run may be open at the end of a run before the replicas are stopped (wait_for_quiet).
QUIET_SECONDS = 60.0  # past the 30 s after which a claim of a send lapses and another process may make it
# How long the audit rows of the run's messages may take to reach the table after it (a sweep each second, rows
# that waited for MariaDB, a stream owed a row only once its bubble's window is over).
AUDIT_WAIT_SECONDS = 180.0
TOKEN_SECONDS = 20  # short-lived tokens: users are looked up in MariaDB again and again, restarts and all
# The streams' Lua scripts by name, whose replies alone `--replies-lost-of` loses.
STREAM_SCRIPTS = {name: spec for name, spec in vars(stream_scripts).items() if isinstance(spec, ScriptSpec)}


def script_sha(name: str | None) -> bytes:
    """What names the script `name` on the wire (the SHA its EVALSHA carries); b"" for none."""
    return hashlib.sha1(STREAM_SCRIPTS[name].source.encode()).hexdigest().encode() if name else b""


def user_database(server: PrivateMariaDB, users: int) -> str:
    """The campaign's user table, with its users; returns its DATABASE_URL."""
    engine = db.make_engine(server.url)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE DATABASE IF NOT EXISTS faults")
    engine.dispose()
    url = f"{server.url}/faults"
    engine = db.make_engine(url)
    db.init_schema(engine)
    directory = UserDirectory(engine)
    for n in range(users):
        directory.add(f"user{n}", f"account{n}")
    engine.dispose()
    return url


def bots_file(directory: Path, ws_url: str, openai_url: str, wecom_api: str) -> Path:
    path = directory / "bots.toml"
    callbacks = "".join(
        f'[bots.{name}]\ncallback_path = "{callback}"\ntoken = "{token}"\nencoding_aes_key = "{key}"\n'
        + (
            f'backend = "openai"\nopenai_base_url = "{openai_url}"\nopenai_model = "{MODEL}"\n\n'
            if app == OPENAI
            else f'dify_api_key = "{api_key}"\n\n'
        )
        for name, callback, token, key, api_key, app in BOTS
    )
    # The chat bot's routes: some of its messages go to the chatflow app and to the OpenAI-compatible server
    # (Workload: bots of the same name, with a command).
    callbacks += (
        f'[[bots.chat.routes]]\nname = "flow"\ncommand = "{FLOW_COMMAND}"\ndify_api_key = "app-flow"\n\n'
        f'[[bots.chat.routes]]\nname = "model"\ncommand = "{MODEL_COMMAND}"\nbackend = "openai"\n'
        f'openai_base_url = "{openai_url}"\nopenai_model = "{MODEL}"\n\n'
    )
    callbacks += proactive.bot_entries(wecom_api)  # its robots, and a schedule's ticks pushed to one
    websocket = (
        f'[bots.ws]\nmode = "long_connection"\nbot_id = "{WS_BOT}"\nsecret = "{WS_SECRET}"\n'
        f'wecom_ws_url = "{ws_url}"\ndify_api_key = "app-ws"\n'
    )
    path.write_text(callbacks + websocket)
    return path


# Content rules that no answer of a campaign matches, but whose beginnings every sentence does ("〔" opens each, and
# the pattern needs a sentence 999): every delta's tail waits on the mask for the next, so the mask's holding and
# release run on every answer, while the text the checker reads stays as Dify wrote it.
CAMPAIGN_RULES = "〔zzzzzz\nre:〔[0-9a-f]{6}·999〕\n"


def controls(directory: Path, users: int) -> dict[str, str]:
    """The enterprise's controls, on and in the way of every message but never refusing one: the content rules above,
    a daily quota far above what a campaign asks (each message counted once), and a cap per bot of as many answers
    as there are users (each answer takes a slot and gives it back; a slot leaked by a kill would make questions
    wait, then end busy, which the checker counts)."""
    rules = directory / "rules.txt"
    rules.write_text(CAMPAIGN_RULES, encoding="utf-8")
    return {
        "CONTENT_RULES_FILE": str(rules),
        "QUOTA_USER_MESSAGES_PER_DAY": "100000",
        "MAX_ACTIVE_ANSWERS_PER_BOT": str(users),
        "QUEUE_WAIT_SECONDS": "30",
    }


def start_topology(kind: str, links: dict):
    """Start the Redis of `kind`, reached through proxies the nemesis can fault (`links["redis"]`). One server runs
    with its append-only file (a crash and restart keeps what it held), and each replica reaches it through a link of
    its own, so that one replica can be cut off from it; a Sentinel set and a Cluster run without persistence (their
    replicas hold the data), and each of their servers is reached through the one link in front of it, which it
    announces as its address."""
    if kind == "standalone":
        server = PrivateRedisServer(persistent=True).start()
        links["redis"] = LinkGroup(server.port, REPLICAS).start()
        return server
    links["redis"] = servers = ServerLinks()
    return {"sentinel": PrivateSentinelSet, "cluster": PrivateRedisCluster}[kind](front=servers.front).start()


def keep_redis_logs(topology, into: Path) -> None:
    """Copy each Redis server's and sentinel's own log beside the history: what they say of failovers, syncs and
    refusals explains what the replicas saw of them (the topology's directory goes when it stops)."""
    if isinstance(topology, PrivateRedisServer):
        named = {"server": topology}
    elif isinstance(topology, PrivateSentinelSet):
        named = {f"server-{s.address_port}": s for s in topology.servers}
        named |= {f"sentinel-{s.port}": s for s in topology.sentinels}
    else:
        named = {f"node-{node.address_port}": node for node in topology.nodes}
    into.mkdir(parents=True, exist_ok=True)
    for name, server in named.items():
        if server.log_path.exists():
            shutil.copyfile(server.log_path, into / f"{name}.log")


def run_topology(kind: str, options, out_dir: Path) -> dict:
    rng = random.Random(f"{options.seed}:{kind}")
    directory = out_dir / kind
    directory.mkdir(parents=True, exist_ok=True)
    lease = options.lease_seconds or (5 if kind == "standalone" else 10)
    # The network between the replicas and Dify and Redis runs through proxies the nemesis can cut or slow.
    links: dict = {}
    topology = start_topology(kind, links)
    app_types = {"app-flow": "advanced-chat", "app-form": "advanced-chat", "app-ws": "chat"}
    dify = DifyStandIn(api_key="app-chat", app_types=app_types, ping_interval=2.0, version=options.dify_version)
    dify.start()
    openai = OpenAIStandIn(model=MODEL).start()
    standin = WeComWebSocketStandIn({WS_BOT: WS_SECRET}, stamp_frames=True).start()
    database = PrivateMariaDB().start()
    # the backends' links, faulted together (a fault of "Dify's link" is one of the OpenAI-compatible server's too)
    links["dify"] = LinkGroup.of(FaultyLink(urlsplit(dify.base_url).port), FaultyLink(openai.server.port)).start()
    to_dify, to_openai = (link.port for link in links["dify"].links)
    auth = AuthStandIn(api_key=AUTH_KEY, expires_in=TOKEN_SECONDS).start()
    wecom_api = WeComApiStandIn(keys=(proactive.PUSH_ROBOT, proactive.TICK_ROBOT)).start()
    links["wecom_api"] = FaultyLink(wecom_api.server.port).start()
    wecom_api_url = f"http://127.0.0.1:{links['wecom_api'].port}"
    env = {
        "DEMO_MODE": "false",
        "BOTS_FILE": str(bots_file(directory, standin.url, f"http://127.0.0.1:{to_openai}/v1", wecom_api_url)),
        "PUSH_API_TOKEN": proactive.PUSH_API_TOKEN,
        "DIFY_BASE_URL": dify.base_url.replace(f":{urlsplit(dify.base_url).port}", f":{to_dify}"),
        "DIFY_READ_TIMEOUT": "8",
        "REDIS_URL": topology.url,
        "AUTH_MODE": "external",
        "DATABASE_URL": (database_url := user_database(database, options.users)),
        "AUTH_API_URL": auth.url,
        "AUTH_API_KEY": AUTH_KEY,
        "AUTH_TOKEN_MARGIN": "5",
        "LOG_LEVEL": "INFO",
        "STREAM_LEASE_SECONDS": str(lease),
        "STREAM_WINDOW_SECONDS": str(options.window),
        "GUNICORN_GRACEFUL_TIMEOUT": "20",
        **(controls(directory, options.users) if options.controls else {}),
    }
    app = f"bench.faults.mutants:create_app({options.mutant!r})" if options.mutant else "app:create_app()"
    replicas = [
        GunicornReplica(env | redis_link(links, n), directory, f"replica-{n}", options.workers, app)
        for n in range(REPLICAS)
    ]
    for replica in replicas:
        replica.start(timeout=60)
    replicas_up = time.time()
    urls = [replica.url for replica in replicas]
    bots = [
        Bot(name, WeComSimulator(urls, token, key, callback_path=callback, timeout=5.0), app, app_key=api_key or MODEL)
        for name, callback, token, key, api_key, app in BOTS
    ]
    chat = bots[0]
    bots += [
        Bot("chat", chat.simulator, CHATFLOW, command=FLOW_COMMAND, app_key="app-flow"),
        Bot("chat", chat.simulator, OPENAI, command=MODEL_COMMAND, app_key=MODEL),
    ]
    ws_simulator = WeComSimulator(urls, "unused", BOTS[0][3])  # only for msgids and its (unused) inbox
    bots.append(Bot("ws", ws_simulator, CHAT, standin=standin, bot_id=WS_BOT, app_key="app-ws"))
    history = History()
    unready: set[int] = set()  # the nemesis's word on which replicas a load balancer would route nothing to
    workload = Workload(
        [bot for bot in bots if not options.bots or bot.name in options.bots],
        replicas,
        dify,
        history,
        rng,
        openai=openai,
        window_seconds=options.window + 20,
        long_share=options.long_share,
        retry_share=options.retry_share,
        unready=unready,
    )
    users = Arrivals(workload, options.users, options.arrivals) if options.arrivals else Users(workload, options.users)
    nemesis = Nemesis(
        topology,
        replicas,
        history,
        random.Random(f"{options.seed}:{kind}:nemesis"),
        lease,
        database,
        unready=unready,
        links=links,
        wecom=standin,
        ws_bot=WS_BOT,
        ws_lease_key=Keys(bot_keys("ws")).ws_lease(WS_BOT),
        inboxes=list({id(bot.simulator): bot.simulator.inbox for bot in bots if bot.standin is None}.values()),
        auth=auth,
        calm_every=options.calm_every,
        replies_lost=options.replies_lost,
        replies_to=script_sha(options.replies_lost_of),
        only=options.faults,
    )
    workload.calm = nemesis.calm  # no Dify fault of the workload's in the nemesis's control phases either
    pusher = proactive.Pusher(replicas, history, random.Random(f"{options.seed}:{kind}:pushes"), unready)
    started = time.time()
    try:
        users.start()
        pusher.start()
        nemesis.start()
        time.sleep(options.minutes * 60)
        nemesis.finish()
        pusher.stop.set()
        users.finish(timeout=options.window + 60)
        pusher.finish()
        wait_for_quiet(dify, openai)
        collect(history, dify, bots)
        collect_openai(history, openai)
        open_ticks = Keys(bot_keys("chat")).schedule_open()
        proactive.collect(history, wecom_api, data_client(topology), open_ticks, replicas_up)
        collect_audit(history, database_url)
        unreplicated = counter_by(replicas, "redis_writes_unreplicated_total", "write")
        polls_unreplicated = counter_by(replicas, "wecom_poll_text_unreplicated_total", "outcome")
    finally:
        for replica in replicas:
            replica.kill()
        for simulator in {id(bot.simulator): bot.simulator for bot in bots}.values():  # (a bot's routes share its)
            simulator.close()
        dify.stop()
        openai.stop()
        for link in links.values():
            link.stop()
        standin.stop()
        auth.stop()
        wecom_api.stop()
        database.remove()
        keep_redis_logs(topology, directory / "redis-logs")
        topology.stop()
    workers_of(history, replicas)
    history.write(directory / "history.jsonl")
    result = check(history.events, forgive=options.mutant in FORGIVING)
    result["took_s"] = round(time.time() - started, 1)
    result["lease_seconds"] = lease
    result["tracebacks_in_logs"] = sum(r.logs().count("Traceback") for r in replicas)
    result["redis_writes_unreplicated_total"] = unreplicated
    result["wecom_poll_text_unreplicated_total"] = polls_unreplicated
    result["history"] = str(directory / "history.jsonl")
    return result


def redis_link(links: dict, replica: int) -> dict[str, str]:
    """Replica `replica`'s REDIS_URL through its own link to one server (none: the addresses the topology names)."""
    if not isinstance(links.get("redis"), LinkGroup):
        return {}
    return {"REDIS_URL": f"redis://127.0.0.1:{links['redis'].links[replica].port}/0"}


def wait_for_quiet(dify: DifyStandIn, openai: OpenAIStandIn, quiet: float = QUIET_SECONDS, most: float = 120.0) -> None:
    """A user's loop ends with their bubble, but a bubble that said "the rest follows" ends before its answer does:
    wait until neither backend has had an answer open for `quiet` seconds (the rests go out seconds after their
    answers end), at most `most`, before the replicas are stopped, so that every promise the run counts is one they
    could keep (the 10-minute one-server run of seed 12 counted one lost: its replicas were killed while the answer
    still streamed)."""
    quiet_since = time.monotonic()
    deadline = quiet_since + most
    while time.monotonic() < deadline:
        if dify.open_streams or openai.open_streams:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet:
            return
        time.sleep(0.5)


def collect(history: History, dify: DifyStandIn, bots: list[Bot]) -> None:
    """What only the stand-ins saw: Dify's chat requests and form submissions, and the messages posted to each
    response_url (a message's, and its card taps')."""
    with dify._lock:
        requests = list(dify.requests)
        submissions = list(dify.form_submissions)
        reattaches = list(dify.reattaches)
        record_reads = list(dify.record_reads)
    for reattach in reattaches:  # a run followed again: a resume (with the snapshot) or a form's rest (live)
        history.add("dify_reattach", snapshot=reattach["include_state_snapshot"], t=reattach["at"])
    for run_id in record_reads:  # a run's quiet stream checked against Dify's record of the run
        history.add("dify_record_read", run=run_id)
    for request in requests:
        query = request["body"].get("query", "")
        body, app_key = request["body"], request["headers"].get("authorization", "").rpartition(" ")[2]
        history.add(
            "dify_call",
            tag=query.rsplit(" ", 1)[-1],
            t=request["at"],
            user=body.get("user", ""),
            conversation=body.get("conversation_id") or "",
            app=app_key,
            trace=request["headers"].get("x-trace-id", ""),
        )
    for submission in submissions:
        content = dify.forms[submission["token"]]["public"]["form_content"]  # "Approve <tag>?"
        tag = content.split()[-1].rstrip("?")
        history.add("form_submission", tag=tag, status=submission["status"], t=submission["at"])
    inboxes = {bot.name: bot.simulator.inbox for bot in bots}
    messages = history.of("message")
    taps: dict[str, list[str]] = {}
    for click in history.of("click"):
        taps.setdefault(click["msgid"], []).append(click["response_url"])
    for message in messages:
        inbox = inboxes[message["bot"]]
        for url in [message["response_url"], *taps.get(message["msgid"], [])]:
            for number, body in enumerate(inbox.received(url)):
                content = (body.get("markdown") or {}).get("content", "")
                history.add("response_url", msgid=message["msgid"], content=content, accepted=number == 0)
    standin = next(bot.standin for bot in bots if bot.standin is not None)
    for delivery in history.of("delivery"):
        for frame in standin.frames(delivery.get("req_id", "")):
            stream = frame.get("stream") or {}
            content, finish = stream.get("content", ""), bool(stream.get("finish"))
            at = frame["_received_at"]
            history.add(
                "poll",
                msgid=delivery["msgid"],
                t=at,
                ok=True,
                stream=stream.get("id"),
                bubble=delivery["req_id"],
                content=content,
                finish=finish,
            )
    websocket = sorted((m for m in messages if m.get("mode") == "long_connection"), key=lambda m: m["t"])
    by_tag = {message["tag"]: message["msgid"] for message in websocket}
    for body in list(standin.proactive):
        content, at = (body.get("markdown") or {}).get("content", ""), body["_received_at"]
        tags = {tag for tag, _ in sentences_in(content)} & by_tag.keys()
        if not tags:  # only a note: the user's message that was open then
            earlier = [m for m in websocket if m["userid"] == body.get("chatid") and m["t"] <= at]
            tags = {earlier[-1]["tag"]} if earlier else set()
        for tag in tags:
            history.add("response_url", msgid=by_tag[tag], t=at, content=content, accepted=True)


def collect_openai(history: History, openai: OpenAIStandIn) -> None:
    """The OpenAI-compatible server's completion requests, as Dify calls of the checker's (one a message may make):
    its question's tag, its user, and whether it carried earlier turns (a conversation that went on)."""
    with openai._lock:
        requests = list(openai.requests)
    for request in requests:
        messages = request["body"].get("messages") or [{}]
        earlier = sum(1 for message in messages[:-1] if message.get("role") == "user")
        history.add(
            "dify_call",
            tag=str(messages[-1].get("content", "")).rsplit(" ", 1)[-1],
            t=request["at"],
            user=request["body"].get("user", ""),
            conversation=f"{earlier} turns" if earlier else "",
            app=MODEL,
            trace=request["headers"].get("x-trace-id", ""),
        )


def collect_audit(history: History, database_url: str, most: float = AUDIT_WAIT_SECONDS) -> None:
    """The audit rows of the campaign's messages, as the table holds them once every message has one or `most`
    seconds passed (rows made while MariaDB was down wait in Redis and go in on a later sweep): an `audit_row` event
    per row, for the checker to find exactly one per message whose answer is what its user was shown."""
    wanted = {(message["bot"], message["msgid"]) for message in history.of("message")}
    wanted |= proactive.audit_wanted(history)  # the ticks'
    engine = db.make_engine(database_url)
    deadline = time.monotonic() + most
    try:
        while True:
            with engine.connect() as connection:
                rows = connection.execute(
                    select(wecom_audit.c.bot, wecom_audit.c.msgid, wecom_audit.c.kind, wecom_audit.c.outcome,
                           wecom_audit.c.answer, wecom_audit.c.route)
                ).all()  # fmt: skip
            if wanted <= {(row.bot, row.msgid) for row in rows} or time.monotonic() > deadline:
                break
            time.sleep(2.0)
    finally:
        engine.dispose()
    for row in rows:
        history.add(
            "audit_row", msgid=row.msgid, bot=row.bot, row=row.kind, outcome=row.outcome, answer=row.answer,
            route=row.route,
        )  # fmt: skip


def workers_of(history: History, replicas) -> None:
    """Which replica worked on each message, and when (a `worked` event per message and replica: the first and the
    last of its log lines that name the message), from the replicas' own logs: the checker excuses a second Dify call
    or a note by a replica fault only when that replica was on the message's path."""
    spans: dict[tuple[str, int], list[float]] = {}
    for index, replica in enumerate(replicas):
        for line in replica.logs().splitlines():
            if '"msgid"' not in line:
                continue
            try:
                record = orjson.loads(line)
                at = datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()
            except (ValueError, KeyError):
                continue
            span = spans.setdefault((record["msgid"], index), [at, at])
            span[0], span[1] = min(span[0], at), max(span[1], at)
    for (msgid, index), (first, last) in spans.items():
        history.add("worked", msgid=msgid, replica=index, first=first, last=last)


def counter_by(replicas, name: str, label: str) -> dict[str, float]:
    """A counter by one of its labels (redis_writes_unreplicated_total by write, say), summed over the replicas (each
    since its last start: a replica the nemesis killed lost its count), from their /metrics."""
    totals: dict[str, float] = {}
    for replica in replicas:
        try:
            text = httpx.get(f"{replica.url}/metrics", timeout=5).text
        except httpx.HTTPError:
            continue
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    value = sample.labels.get(label, "?")
                    totals[value] = totals.get(value, 0.0) + sample.value
    return dict(sorted(totals.items()))


def versions() -> dict:
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    return {"redis": redis, "machine": harness.machine()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="of faults, per topology")
    parser.add_argument("--topology", choices=[*TOPOLOGIES, "all"], default="all")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers per replica")
    parser.add_argument("--window", type=int, default=90, help="STREAM_WINDOW_SECONDS (WeCom polls 20 s longer)")
    parser.add_argument("--lease-seconds", type=int, default=0, help="default: 5 on one server, 10 on Sentinel/Cluster")
    parser.add_argument(
        "--arrivals", type=float, default=0.0, help="messages per second, open loop (default: closed-loop users)"
    )
    parser.add_argument("--long-share", type=float, default=0.1, help="answers longer than a bubble (callback bots)")
    parser.add_argument("--retry-share", type=float, default=0.15, help="messages WeCom delivers a second time")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--calm-every", type=float, default=90.0, help="seconds of faults between control phases")
    parser.add_argument(
        "--faults",
        type=_fault_kinds,
        default=frozenset(),
        help="only these kinds of fault, comma-separated (default: every kind the topology has)",
    )
    parser.add_argument(
        "--replies-lost",
        type=float,
        default=0.0,
        help="share of replies a *_replies_lost fault loses (default: 10-30 %%, drawn for each)",
    )
    parser.add_argument(
        "--replies-lost-of",
        choices=sorted(STREAM_SCRIPTS),
        help="redis_replies_lost loses only the replies of this script of the streams (default: of every command)",
    )
    parser.add_argument(
        "--bots",
        type=_bot_names,
        default=frozenset(),
        help="only these bots get messages, comma-separated: chat, flow, form, model, ws (default: every bot)",
    )
    parser.add_argument("--controls", action="store_true", help="content rules, a quota and a cap on (never refusing)")
    parser.add_argument("--mutant", choices=sorted(MUTANTS), help="run a deliberately broken build (mutants.py)")
    parser.add_argument("--dify-version", choices=["1.14", "1.16"], default="1.14", help="the Dify the stand-in plays")
    parser.add_argument("--out", help="directory for histories and replica logs (default: a new temporary one)")
    parser.add_argument("--json", help="also write the result to this file")
    options = parser.parse_args(argv)
    out_dir = Path(options.out or tempfile.mkdtemp(prefix="faults-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"seed": options.seed, "minutes": options.minutes, "users": options.users, **versions()}
    result["dify"] = options.dify_version
    result["controls"] = options.controls
    if options.faults:
        result["faults_only"] = sorted(options.faults)
    if options.bots:
        result["bots_only"] = sorted(options.bots)
    if options.mutant:
        result["mutant"] = options.mutant
    for kind in TOPOLOGIES if options.topology == "all" else (options.topology,):
        result[kind] = run_topology(kind, options, out_dir)
        counts = ", ".join(f"{name} {result[kind][name]}" for name in (*COUNTS, "lost_in_intake"))
        print(f"{kind}: {result[kind]['messages']} messages, {result[kind]['faults']} faults: {counts}", flush=True)
    harness.report(result, options.json)
    return result


def _bot_names(text: str) -> frozenset[str]:
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    known = {name for name, *_ in BOTS} | {"ws"}
    if unknown := names - known:
        raise argparse.ArgumentTypeError(f"unknown bot {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    return names


def _fault_kinds(text: str) -> frozenset[str]:
    kinds = frozenset(kind.strip() for kind in text.split(",") if kind.strip())
    if unknown := kinds - ALL_FAULTS:
        raise argparse.ArgumentTypeError(
            f"unknown fault {', '.join(sorted(unknown))}; known: {', '.join(sorted(ALL_FAULTS))}"
        )
    return kinds


if __name__ == "__main__":
    main()
