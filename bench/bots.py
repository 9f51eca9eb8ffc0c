"""Several bots in one deployment (BENCHMARKS.md §8): what routing and per-bot services cost.

1. Poll throughput (wrk, closed loop) and poll latency at `--rate` polls/s (open loop) of one gunicorn replica
   serving the environment's single bot, a bots file of 1 bot, and a bots file of `--bots` bots (default 10), in
   alternating rounds. With several bots the polls are spread over all of them, each signed with its bot's Token
   and sent to its path. Throughput and p99 are reported as ratios to the 1-bot file's, measured in the same round.
2. Start-up with `--startup-bots` bots (default 100) against 1: from launching gunicorn to /readyz answering 200
   on every worker, the time `load_bots` takes to read and check the file, and the replica's resident memory.
3. Bots changed live: what one check of an unchanged bots file costs a serving process (services/bots_watch.py reads
   the stamps of it and of the files its tables name every 5 s in each worker, and reads it only after a change),
   for files of 1, `--bots` and `--startup-bots` bots, each bot's Token read from a file of its own; and what
   reading and checking the file again costs after a change.

    python -m bench.bots --rounds 3
    python -m bench.bots --watch-only
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import string
import tempfile
import time
from pathlib import Path

from bench import harness
from config.bots import load_bots, read_bots
from config.settings import load_settings
from demo import dify_standin as d
from demo.wecom_simulator import WeComSimulator
from services.bots_watch import CHECK_SECONDS, BotsFileWatch

_KEY_ALPHABET = string.ascii_letters + string.digits


def bot_credentials(count: int) -> list[tuple[str, str, str]]:
    """(name, Token, EncodingAESKey) of `count` bots."""
    return [
        (f"bot{i}", f"token-{i}-{secrets.token_hex(4)}", "".join(secrets.choice(_KEY_ALPHABET) for _ in range(43)))
        for i in range(count)
    ]


def write_bots_file(folder: Path, bots: list[tuple[str, str, str]], dify_url: str) -> Path:
    path = folder / f"bots-{len(bots)}.toml"
    tables = [
        f'[bots.{name}]\ntoken = "{token}"\nencoding_aes_key = "{key}"\n'
        f'dify_base_url = "{dify_url}"\ndify_api_key = "{harness.DIFY_KEY}"\n'
        for name, token, key in bots
    ]
    path.write_text("\n".join(tables))
    return path


def simulators(url: str, bots: list[tuple[str, str, str]] | None) -> list[WeComSimulator]:
    """A WeCom simulator per bot (None: the environment's single bot at /wecom/callback)."""
    if bots is None:
        return [WeComSimulator(url, harness.TOKEN, harness.AES_KEY, poll_interval=0.05, timeout=30)]
    return [
        WeComSimulator(url, token, key, callback_path=f"/wecom/callback/{name}", poll_interval=0.05, timeout=30)
        for name, token, key in bots
    ]


def finished_streams(sims: list[WeComSimulator], count: int) -> list[tuple[WeComSimulator, str]]:
    """`count` finished answers, spread over the simulators' bots."""
    streams = []
    for i in range(count):
        sim = sims[i % len(sims)]
        first = sim.send(sim.text_message("finished", userid=f"done{i}"))
        streams.append((sim, sim.follow(first, userid=f"done{i}").stream_id))
    return streams


def signed_polls(streams: list[tuple[WeComSimulator, str]], count: int) -> list[tuple[str, bytes]]:
    """`count` signed polls spread over the streams, each signed by and sent to its own bot."""
    by_bot: dict[WeComSimulator, list[str]] = {}
    for sim, stream_id in streams:
        by_bot.setdefault(sim, []).append(stream_id)
    share = -(-count // len(by_bot))
    return [poll for sim, ids in by_bot.items() for poll in harness.signed_polls(sim, ids, share)][:count]


def measure_polls(env: harness.Environment, label: str, bots_file: Path | None, bots, options, round_number: int):
    env.redis.client().flushall()
    extra = {"GUNICORN_THREADS": str(options.threads)}
    if bots_file is not None:
        extra["BOTS_FILE"] = str(bots_file)
    gateway = env.start_gateway(f"polls-{label}-{round_number}", workers=options.workers, **extra)
    sims = simulators(gateway.url, bots)
    try:
        polls = signed_polls(finished_streams(sims, options.finished), 4000)
        throughput = harness.wrk(gateway.url, polls, options.seconds, options.connections)
        latency = harness.open_loop("127.0.0.1", gateway.port, polls, options.rate, options.seconds)
    finally:
        for sim in sims:
            sim.close()
        env.stop_gateway(gateway)
    return {
        "polls_per_s": round(throughput.rate, 1),
        "poll_p50_ms": round(latency.percentile(50), 2),
        "poll_p99_ms": round(latency.percentile(99), 2),
        "errors": throughput.errors + latency.errors,
    }


def measure_startup(env: harness.Environment, bots_file: Path, options, round_number: int) -> dict:
    """Seconds from launching gunicorn to every worker serving, the file's load alone, and the resident memory."""
    settings = load_settings(env.gateway_env(BOTS_FILE=str(bots_file)), env_files=())
    started = time.perf_counter()
    count = len(load_bots(settings))
    loaded = time.perf_counter() - started
    started = time.perf_counter()
    gateway = env.start_gateway(f"startup-{count}-{round_number}", workers=options.workers, BOTS_FILE=str(bots_file))
    ready = time.perf_counter() - started
    try:
        rss = harness.process_rss_mb(gateway.process.pid)
    finally:
        env.stop_gateway(gateway)
    return {"ready_s": round(ready, 2), "load_bots_ms": round(loaded * 1000, 1), "rss_mb": round(rss, 1)}


def measure_watch(folder: Path, count: int, dify_url: str, checks: int = 200) -> dict:
    """One check of an unchanged bots file of `count` bots (their Tokens in files of their own): its median time,
    and the share of one core it takes at one check every CHECK_SECONDS."""
    bots = bot_credentials(count)
    secrets_folder = folder / f"watch-{count}"
    secrets_folder.mkdir(exist_ok=True)
    tables = []
    for name, token, key in bots:
        (secrets_folder / f"{name}.token").write_text(token)
        tables.append(
            f'[bots.{name}]\ntoken_file = "{name}.token"\nencoding_aes_key = "{key}"\n'
            f'dify_base_url = "{dify_url}"\ndify_api_key = "{harness.DIFY_KEY}"\n'
        )
    path = secrets_folder / "bots.toml"
    path.write_text("\n".join(tables))
    environ = {"BOTS_FILE": str(path), "DEMO_MODE": "false", "REDIS_URL": "redis://127.0.0.1:1/0", "AUTH_MODE": "none"}
    settings = load_settings(environ, env_files=())
    watch = BotsFileWatch(settings, load_bots(settings), apply=lambda bots: None)
    times = []
    for _ in range(checks):
        started = time.perf_counter()
        assert watch.check() == "unchanged"
        times.append(time.perf_counter() - started)
    reads = []
    for _ in range(max(10, checks // 10)):
        started = time.perf_counter()
        read_bots(settings)
        reads.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {
        "check_ms": round(median * 1000, 3),  # the file and the files it names unchanged: their stamps only
        "core_share_pct": round(100 * median / CHECK_SECONDS, 4),
        "read_ms": round(statistics.median(reads) * 1000, 2),  # after a change: the file read and checked again
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bots", type=int, default=10)
    parser.add_argument("--startup-bots", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=10, help="of each throughput and latency run")
    parser.add_argument("--rate", type=float, default=500, help="polls/s of the latency run")
    parser.add_argument("--finished", type=int, default=50)
    parser.add_argument("--connections", type=int, default=32)
    harness.add_gunicorn_arguments(parser)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--watch-only", action="store_true", help="only the live check of the file (3.)")
    options = parser.parse_args(argv)
    started = time.time()
    if options.watch_only:
        folder = Path(tempfile.mkdtemp(prefix="bench-bots-watch-"))
        result = {
            f"watch_{count}_bots": measure_watch(folder, count, "http://127.0.0.1:1/v1")
            for count in (1, options.bots, options.startup_bots)
        }
        result["machine"] = harness.machine()
        harness.report(result, options.json)
        return result
    env = harness.start_environment()
    env.dify.script(d.answer("A finished answer of moderate length. " * 20), match="finished", times=None)
    one, many, crowd = bot_credentials(1), bot_credentials(options.bots), bot_credentials(options.startup_bots)
    files = {
        "one_bot_file": write_bots_file(env.log_dir, one, env.dify.base_url),
        "many_bots_file": write_bots_file(env.log_dir, many, env.dify.base_url),
    }
    configs = [("environment", None, None), ("one_bot_file", files["one_bot_file"], one)]
    configs.append(("many_bots_file", files["many_bots_file"], many))
    crowd_file = write_bots_file(env.log_dir, crowd, env.dify.base_url)
    polls: dict[str, list[dict]] = {label: [] for label, _, _ in configs}
    startups: dict[str, list[dict]] = {"1": [], str(options.startup_bots): []}
    try:
        for round_number in range(options.rounds):
            for label, path, bots in configs:
                polls[label].append(measure_polls(env, label, path, bots, options, round_number))
            for label, path in (("1", files["one_bot_file"]), (str(options.startup_bots), crowd_file)):
                startups[label].append(measure_startup(env, path, options, round_number))
    finally:
        env.close()
    result: dict = {
        "rounds": options.rounds,
        "bots": options.bots,
        "gunicorn": f"gthread {options.workers}x{options.threads}",
    }
    for label, rounds in polls.items():
        summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "errors"}
        summary["errors"] = sum(r["errors"] for r in rounds)
        if label != "one_bot_file":
            base = polls["one_bot_file"]
            summary["polls_ratio_per_round"] = [
                round(r["polls_per_s"] / b["polls_per_s"], 3) for r, b in zip(rounds, base, strict=True)
            ]
            summary["p99_ratio_per_round"] = [
                round(r["poll_p99_ms"] / b["poll_p99_ms"], 3) for r, b in zip(rounds, base, strict=True)
            ]
            summary["polls_ratio"] = round(statistics.median(summary["polls_ratio_per_round"]), 3)
        result[label] = summary
    for label, rounds in startups.items():
        result[f"startup_{label}_bots"] = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    result["seconds"] = round(time.time() - started, 1)
    result["machine"] = harness.machine()
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
