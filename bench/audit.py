"""The audit trail's cost and its guarantees under load (BENCHMARKS.md §16), on a private MariaDB:

1. poll throughput (wrk) and the first reply to a new message (open loop, p50/p99) with AUDIT=on and AUDIT=off,
   in alternating rounds of one run (this machine is noisy: compare within a run);
2. `--answers` messages at `--rate` per second (first, on a fresh Redis), answered and polled as WeCom polls them,
   with AUDIT=on: how long until every row is in the table, rows per second, and whether any is missing or there
   twice;
3. one process's sweep alone: `--sweep-streams` finished streams listed as due, written by one AuditTrail;
4. `flask --app app audit export` of `--export-rows` rows (and of a tenth of them): its time and peak RSS, which
   must not grow with the rows.

    python -m bench.audit --seconds 10 --rounds 3 --rate 200 --answers 4000 --export-rows 1000000
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from urllib.parse import urlencode

import pymysql
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from bench import harness
from bench.poll_load import open_streams
from demo import dify_standin as d
from demo.mariadb_server import PrivateMariaDB
from services.audit.records import AuditRecords
from services.audit.rows import AuditRow
from services.audit.table import ensure_table, wecom_audit
from services.audit.trail import AuditTrail
from services.auth import db
from services.keys import Keys
from services.streams.life import ANSWERED, MESSAGE


def database(server_url: str, name: str) -> str:
    """A fresh database `name` on the private server; its URL."""
    url = make_url(server_url)
    connection = pymysql.connect(host=url.host, port=url.port, user=url.username, autocommit=True)
    with connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    connection.close()
    return url.set(database=name).render_as_string(hide_password=False)


def rows_in(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(wecom_audit)).scalar_one()


def cost(env: harness.Environment, database_url: str, options) -> dict:
    """Poll throughput and first-reply latency, audit on and off, in alternating rounds."""
    samples: dict[str, list[float]] = {f"{k}_{m}": [] for k in ("polls", "p50", "p99") for m in ("on", "off")}
    for round_number in range(options.rounds):
        for mode in ("off", "on"):
            gateway = env.start_gateway(f"audit-{mode}-{round_number}", AUDIT=mode, DATABASE_URL=database_url)
            try:
                live, finished = open_streams(env, gateway.url, 20, 50, options.seconds * 2 + 20, 1.0)
                sim = env.simulator(gateway.url)
                polls = harness.wrk(gateway.url, harness.signed_polls(sim, live + finished, 2000), options.seconds, 16)
                messages = []
                for i in range(int(options.message_rate * options.seconds)):
                    query, body = sim.envelope(sim.text_message("hello", userid=f"r{round_number}{mode}u{i}"))
                    messages.append((f"{harness.CALLBACK}?{urlencode(query)}", body))
                latency = harness.open_loop("127.0.0.1", gateway.port, messages, options.message_rate, options.seconds)
                sim.close()
            finally:
                env.stop_gateway(gateway)
            samples[f"polls_{mode}"].append(polls.rate)
            samples[f"p50_{mode}"].append(latency.percentile(50))
            samples[f"p99_{mode}"].append(latency.percentile(99))
            print(
                f"round {round_number} audit {mode}: {polls.rate:.0f} polls/s, first reply p99 "
                f"{latency.percentile(99):.1f} ms",
                file=sys.stderr,
            )
    ratios = [on / off for on, off in zip(samples["polls_on"], samples["polls_off"], strict=True)]
    return {
        "polls_per_s_on": statistics.median(samples["polls_on"]),
        "polls_per_s_off": statistics.median(samples["polls_off"]),
        "polls_ratio_on_to_off": statistics.median(ratios),
        "polls_ratio_by_round": [round(r, 3) for r in ratios],
        "first_reply_p50_ms_on": statistics.median(samples["p50_on"]),
        "first_reply_p99_ms_on": statistics.median(samples["p99_on"]),
        "first_reply_p99_ms_off": statistics.median(samples["p99_off"]),
        "samples": samples,
    }


def rows_under_load(env: harness.Environment, database_url: str, options) -> dict:
    """`answers` messages at `rate`/s, each answered at once and its bubble polled as WeCom polls it (an unpolled
    bubble's answer would go out through response_url instead): every row in the table, once."""
    engine = db.make_engine(database_url)
    gateway = env.start_gateway("audit-rows", AUDIT="on", DATABASE_URL=database_url, RATE_LIMIT_PER_MINUTE="0")
    failures: list[str] = []
    try:
        env.dify.script(d.answer("A short answer."), times=None)
        sim = env.simulator(gateway.url, poll_interval=0.5)
        payloads = [sim.text_message(f"question {i}", userid=f"load{i}") for i in range(options.answers)]

        def converse(payload: dict) -> None:
            try:
                sim.follow(sim.send(payload), userid=payload["from"]["userid"])
            except Exception as exc:  # noqa: BLE001 -- counted: the figure is how many went wrong
                failures.append(type(exc).__name__)

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=options.clients) as pool:
            for i, payload in enumerate(payloads):
                time.sleep(max(0.0, started + i / options.rate - time.monotonic()))
                pool.submit(converse, payload)
        sent_s = time.monotonic() - started
        sim.close()
        deadline = time.monotonic() + 120
        while rows_in(engine) < options.answers and time.monotonic() < deadline:
            time.sleep(0.5)
        all_in = time.monotonic() - started
        time.sleep(3)  # a late second write of any row would show now
        with engine.connect() as connection:
            written = [row.msgid for row in connection.execute(select(wecom_audit.c.msgid))]
    finally:
        env.stop_gateway(gateway)
        engine.dispose()
    msgids = {payload["msgid"] for payload in payloads}
    return {
        "messages": options.answers,
        "asked_rate": options.rate,
        "achieved_rate": round(options.answers / sent_s, 1),
        "conversations_failed": len(failures),
        "rows": len(written),
        "missing": len(msgids - set(written)),
        "others": len(set(written) - msgids),
        "twice": len(written) - len(set(written)),
        "all_rows_in_s": round(all_in, 1),
        "rows_per_s": round(len(written) / all_in, 1),
    }


def sweep_rate(env: harness.Environment, database_url: str, streams: int) -> dict:
    """One process's sweep alone: `streams` finished streams listed as due, written by one AuditTrail (the sweeper's
    work, without the answers): rows per second, and whether each is there once."""
    client = env.redis.client()
    keys = Keys("sweep:")
    now = time.time()
    pipe = client.pipeline(transaction=False)
    for i in range(streams):
        meta = {"status": "done", "msgid": f"sweep-{i}", "userid": f"u{i % 500}", "query": f"question {i}"}
        pipe.hset(keys.stream(f"s{i}"), mapping={**meta, "created_at": now, "finished_at": now})
        pipe.rpush(keys.stream_chunks(f"s{i}"), "一段回答，" * 20)
        pipe.zadd(keys.audit_due(), {f"s{i}": now})
    pipe.execute()
    engine = db.make_engine(database_url)
    ensure_table(engine)
    trail = AuditTrail(client, keys, AuditRecords(engine), "sweep")
    started = time.monotonic()
    while client.zcard(keys.audit_due()):
        trail.sweep()
    seconds = time.monotonic() - started
    with engine.connect() as connection:
        written = [row.msgid for row in connection.execute(select(wecom_audit.c.msgid))]
    engine.dispose()
    client.flushdb()
    return {
        "streams": streams,
        "rows": len(written),
        "twice": len(written) - len(set(written)),
        "seconds": round(seconds, 2),
        "rows_per_s": round(len(written) / seconds),
    }


def seed(engine, count: int) -> None:
    """`count` rows of a year's messages, a few hundred characters each, written 5,000 at a time."""
    records = AuditRecords(engine)
    start = datetime(2025, 12, 1)
    answer = "一段中等长度的回答，" * 20
    for first in range(0, count, 5000):
        batch = []
        for i in range(first, min(count, first + 5000)):
            at = (start + timedelta(seconds=i * 30)).timestamp()
            batch.append(
                AuditRow(
                    "default",
                    f"seed-{i}",
                    MESSAGE,
                    ANSWERED,
                    at,
                    at + 3,
                    userid=f"u{i % 500}",
                    question=f"question {i}",
                    answer=answer,
                )
            )
        records.insert(batch)


# `flask --app app audit export`, saying its own peak RSS (KiB) on stderr as it exits.
EXPORT = (
    "import atexit, resource, sys; "
    "atexit.register(lambda: print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
    "file=sys.stderr)); "
    "from flask.cli import main; sys.argv = ['flask', '--app', 'app', 'audit', 'export']; main()"
)


def export(env: harness.Environment, database_url: str, rows: int) -> dict:
    """`flask audit export` of every row to /dev/null: its time and its peak RSS."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", EXPORT],
        cwd=harness.project_root(),
        env={**env.gateway_env(DATABASE_URL=database_url), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
        timeout=3600,
    )
    seconds = time.monotonic() - started
    peak_kib = int(done.stderr.rsplit("peak_rss_kib", 1)[1].split()[0])
    return {
        "rows": rows,
        "seconds": round(seconds, 1),
        "rows_per_s": round(rows / seconds),
        "peak_rss_mb": round(peak_kib / 1024, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--message-rate", type=float, default=50.0, help="new messages/s for the first-reply run")
    parser.add_argument("--rate", type=float, default=200.0, help="finished answers/s for the rows run")
    parser.add_argument("--answers", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=64, help="conversations under way at once, at most")
    parser.add_argument("--sweep-streams", type=int, default=20_000, help="finished streams for one sweeper alone")
    parser.add_argument("--export-rows", type=int, default=1_000_000)
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    env = harness.start_environment()
    mariadb = PrivateMariaDB().start()
    try:
        result = {"rows_under_load": rows_under_load(env, database(mariadb.url, "bench_rows"), options)}
        result["sweep"] = sweep_rate(env, database(mariadb.url, "bench_sweep"), options.sweep_streams)
        result["cost"] = cost(env, database(mariadb.url, "bench_cost"), options)
        exports = []
        for rows in (options.export_rows // 10, options.export_rows):
            url = database(mariadb.url, f"bench_export_{rows}")
            engine = db.make_engine(url)
            ensure_table(engine)
            seed(engine, rows)
            engine.dispose()
            exports.append(export(env, url, rows))
        result["export"] = exports
        result["machine"] = harness.machine()
    finally:
        mariadb.remove()
        env.close()
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
