"""Routes (BENCHMARKS.md §22): what choosing a route costs a message, and what a bot's routes cost its polls.

1. In this process: `RouteTable.choose` over 10, 100 and `--routes` routes (a third commands, a third chats, a
   third users, some with two conditions), for messages that no route takes (every condition looked at) and
   messages the last route takes; beside it, the same rule read route by route (what the index replaced).
2. Under gunicorn: poll throughput (wrk) of one bot without routes and of the same bot with `--poll-routes`
   routes, in alternating rounds of one run, and the first again (how far apart two runs of one replica are); the
   ratios to the first in each round. Polls never choose a route (a new message
   does), so this measures what the routes' per-route parts cost a serving process. Also the time from launching
   gunicorn to every worker serving, and the replica's memory, for each.
3. In one process, without sockets but Redis's: the WSGI app of each of the two bots files called directly with
   the same signed polls, in alternating batches (`--batches` of `--batch` polls each): the time a poll takes with
   the routes over without, far less noisy than 2. on a small machine.

    python -m bench.routes --rounds 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from functools import partial
from pathlib import Path

from app import create_app
from bench import harness
from bench.bots import finished_streams, signed_polls, simulators
from bench.profile_poll import environs, run
from config.settings import BotSettings, RouteSettings, load_settings
from demo import dify_standin as d
from services.chat.routes import OWN, RouteTable


def make_routes(count: int, rng: random.Random) -> tuple[RouteSettings, ...]:
    """`count` routes over commands, chats and users (a fifth with a second condition)."""
    settings = BotSettings()
    routes = []
    for i in range(count):
        kind = i % 3
        command = f"/app{i}" if kind == 0 else ""
        chats = (f"wrkChat{i:05d}",) if kind == 1 or rng.random() < 0.2 else ()
        users = (f"user{i:05d}",) if kind == 2 else ()
        routes.append(RouteSettings(f"r{i}", settings, command, chats, users))
    return tuple(routes)


def by_reading(routes: tuple[RouteSettings, ...], text: str, userid: str, chatid: str) -> str:
    """The rule read route by route: what `RouteTable.choose` does with its index."""
    head = text.split(maxsplit=1)[0].lower() if text.strip() else ""
    command = head if head.startswith("/") else ""
    for route in routes:
        if route.command and route.command != command:
            continue
        if route.chats and chatid not in route.chats:
            continue
        if route.users and userid not in route.users:
            continue
        return route.name
    return OWN


def per_message(count: int, rng: random.Random, repeats: int = 20000) -> dict:
    """Microseconds a message: the index and the reading, for a message no route takes and one the last takes."""
    routes = make_routes(count, rng)
    table = RouteTable(routes)
    last = routes[-1]
    cases = {
        "no_route": ("what is the weather like today?", "someone", "wrkElsewhere"),
        "last_route": (f"{last.command} a question".strip(), (last.users or ("someone",))[0], (last.chats or ("",))[0]),
    }
    result = {}
    for case, (text, userid, chatid) in cases.items():
        assert table.choose(text, userid, chatid).route == by_reading(routes, text, userid, chatid)
        for name, choose in (("index", table.choose), ("reading", partial(by_reading, routes))):
            runs = max(200, repeats // (1 + count // 100)) if name == "reading" else repeats
            started = time.perf_counter()
            for _ in range(runs):
                choose(text, userid, chatid)
            result[f"{case}_{name}_us"] = round((time.perf_counter() - started) / runs * 1e6, 2)
    return result


def bots_file(folder: Path, dify_url: str, routes: int) -> Path:
    """One bot, `bench`, with `routes` routes (each a Dify app of its own key: a client and profile each)."""
    text = (
        f'[bots.bench]\ntoken = "{harness.TOKEN}"\nencoding_aes_key = "{harness.AES_KEY}"\n'
        f'dify_base_url = "{dify_url}"\ndify_api_key = "{harness.DIFY_KEY}"\n'
    )
    for i in range(routes):
        text += f'\n[[bots.bench.routes]]\nname = "r{i}"\ncommand = "/app{i}"\ndify_api_key = "app-route-{i}"\n'
    path = folder / f"bots-{routes}-routes.toml"
    path.write_text(text)
    return path


def measure(env: harness.Environment, label: str, path: Path, options, round_number: int) -> dict:
    env.redis.client().flushall()
    started = time.perf_counter()
    gateway = env.start_gateway(
        f"routes-{label}-{round_number}",
        workers=options.workers,
        BOTS_FILE=str(path),
        GUNICORN_THREADS=str(options.threads),
    )
    ready = time.perf_counter() - started
    sims = simulators(gateway.url, [("bench", harness.TOKEN, harness.AES_KEY)])
    try:
        rss = harness.process_rss_mb(gateway.process.pid)
        polls = signed_polls(finished_streams(sims, options.finished), 4000)
        throughput = harness.wrk(gateway.url, polls, options.seconds, options.connections)
    finally:
        for sim in sims:
            sim.close()
        env.stop_gateway(gateway)
    return {"polls_per_s": round(throughput.rate, 1), "errors": throughput.errors, "ready_s": round(ready, 2),
            "rss_mb": round(rss, 1)}  # fmt: skip


def in_process(env: harness.Environment, files: dict[str, Path], options) -> dict:
    """Microseconds a poll takes in each app (the median over alternating batches), and their ratio by batch."""
    apps = {}
    for label, path in files.items():
        settings = load_settings(env.gateway_env(BOTS_FILE=str(path)), env_files=())
        apps[label] = create_app(settings)
    sims = simulators("http://unused", [("bench", harness.TOKEN, harness.AES_KEY)])
    client = next(iter(apps.values())).test_client()
    stream_ids = []
    for i in range(20):  # finished answers, in the keys both apps read (one bot, `bench`)
        query, body = sims[0].envelope(sims[0].text_message("finished", userid=f"done{i}"))
        reply = client.post("/wecom/callback/bench", query_string=query, data=body).get_json()
        stream_ids.append(sims[0].open_reply(reply, query["nonce"])["stream"]["id"])
    time.sleep(2.0)
    polls = environs(harness.signed_polls(sims[0], stream_ids, 2000))
    for app in apps.values():
        run(app, polls, 500)  # warm
    times: dict[str, list[float]] = {label: [] for label in apps}
    for _ in range(options.batches):
        for label, app in apps.items():
            times[label].append(run(app, polls, options.batch)[0] * 1e6)
    for sim in sims:
        sim.close()
    for app in apps.values():
        app.extensions["gateway"].close()
    base, routed = times["no_routes"], times[f"{options.poll_routes}_routes"]
    ratios = [b / r for b, r in zip(base, routed, strict=True)]  # polls/s with routes over without
    return {
        **{f"{label}_poll_us_median": round(statistics.median(values), 1) for label, values in times.items()},
        "ratio_by_batch_quartiles": [round(q, 3) for q in statistics.quantiles(ratios, n=4)],
        "ratio_median": round(statistics.median(ratios), 3),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", type=int, default=1000, help="the most routes a message is chosen among")
    parser.add_argument("--poll-routes", type=int, default=1000, help="the routes of the bot whose polls are measured")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--finished", type=int, default=50)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--choose-only", action="store_true", help="only the cost of choosing (1.)")
    parser.add_argument("--in-process-only", action="store_true", help="only the polls called in one process (3.)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2000)
    harness.add_gunicorn_arguments(parser)
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    rng = random.Random(1)
    result: dict = {"choose": {str(n): per_message(n, rng) for n in (10, 100, options.routes)}}
    if not options.choose_only:
        env = harness.start_environment()
        env.dify.script(d.answer("A finished answer of moderate length. " * 20), match="finished", times=None)
        files = {"no_routes": bots_file(env.log_dir, env.dify.base_url, 0)}
        files[f"{options.poll_routes}_routes"] = bots_file(env.log_dir, env.dify.base_url, options.poll_routes)
        try:
            result["in_process"] = in_process(env, files, options)
            if options.in_process_only:
                result["machine"] = harness.machine()
                harness.report(result, options.json)
                return result
            files["no_routes_again"] = files["no_routes"]  # the same replica again: how far apart two runs of one are
            rounds: dict[str, list[dict]] = {label: [] for label in files}
            for round_number in range(options.rounds):
                for label, path in files.items():
                    rounds[label].append(measure(env, label, path, options, round_number))
        finally:
            env.close()
        result["polls"] = rounds
        for label in (f"{options.poll_routes}_routes", "no_routes_again"):
            ratios = [
                r["polls_per_s"] / n["polls_per_s"] for r, n in zip(rounds[label], rounds["no_routes"], strict=True)
            ]
            result[f"{label}_ratio_by_round"] = [round(ratio, 3) for ratio in ratios]
            result[f"{label}_ratio_median"] = round(statistics.median(ratios), 3)
    result["machine"] = harness.machine()
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
