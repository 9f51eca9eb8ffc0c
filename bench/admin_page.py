"""The operator's page (BENCHMARKS.md §23), on a private MariaDB and a private Redis:

1. the audit search over `--rows` rows (half a year of messages of 4 bots, 3 routes and each bot's own, 5,000 users,
   400 group chats, every outcome): each kind of search the page makes (the newest rows; one user; one chat; one
   route; one outcome; a bot and an outcome; a day; text in a day; text anywhere), `--repeats` times each, through
   AuditRecords.latest as the page calls it: p50 and p95 in ms;
2. the live view with `--answers` answers in flight among `--other-keys` other keys: one refresh's time and its
   Redis commands (LiveAnswers.now: the bot's sorted set, then one hash read and one length per answer, pipelined),
   beside what a SCAN of the keyspace (the streams inspector's way) costs for the same answers; and what keeping
   the list costs each message (its entry added as it opens, taken off as it ends: two round trips).

    python -m bench.admin_page --rows 1000000 --repeats 30 --answers 1000
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.exc import OperationalError

from bench import harness
from bench.audit import database
from demo.mariadb_server import PrivateMariaDB
from demo.redis_server import PrivateRedisServer
from services.admin.live import LiveAnswers
from services.audit.records import AuditFilter, AuditRecords
from services.audit.rows import AuditRow
from services.audit.table import ensure_table
from services.auth import db
from services.keys import Keys
from services.streams.inspector import StreamInspector
from services.streams.life import ANSWERED, BLOCKED, BUSY, ERROR, MESSAGE, NOTE, OVER_QUOTA, STOPPED
from services.streams.record import F
from web.admin import TEXT_MOST_ROWS

BOTS = ("default", "hr", "it", "sales")
ROUTES = ("", "", "", "", "", "flow", "model", "legal")  # most messages take the bot's own
OUTCOMES = [ANSWERED] * 88 + [NOTE] * 4 + [STOPPED] * 2 + [BLOCKED, OVER_QUOTA, OVER_QUOTA, BUSY, ERROR, ERROR]
WORDS = ["报销", "差旅", "发票", "请假", "年假", "笔记本", "审批", "合同", "采购", "会议室", "VPN", "密码"]
WORDS += ["打印机", "工资", "社保", "公积金"]


def seed(records: AuditRecords, count: int, rng: random.Random) -> datetime:
    """`count` rows over half a year up to now, 5,000 a write; returns when the last was received."""
    end = datetime.now()
    start = end - timedelta(days=182)
    step = (end - start).total_seconds() / count
    for first in range(0, count, 5000):
        batch = []
        for i in range(first, min(count, first + 5000)):
            at = (start + timedelta(seconds=i * step)).timestamp()
            group = rng.random() < 0.3
            words = " ".join(rng.choice(WORDS) for _ in range(3))
            batch.append(
                AuditRow(
                    rng.choice(BOTS),
                    f"seed-{i}",
                    MESSAGE,
                    rng.choice(OUTCOMES),
                    at,
                    at + rng.uniform(1, 20),
                    userid=f"user{rng.randrange(5000)}",
                    chatid=f"chat{rng.randrange(400)}" if group else "",
                    chattype="group" if group else "single",
                    msgtype="text",
                    question=f"关于{words}的问题 {i}",
                    answer=f"关于{words}：" + "一段中等长度的回答，" * rng.randint(5, 30),
                    backend="dify",
                    route=rng.choice(ROUTES),
                )
            )
        records.insert(batch)
    return end


def searches(records: AuditRecords, last: datetime) -> dict[str, Callable[[], list[dict]]]:
    """The page's searches, as it runs them: a text search without a user or a chat reads the newest 40,000 rows
    of its range at most (one indexed read finds where they begin, then the search)."""

    def latest(which: AuditFilter) -> Callable[[], list[dict]]:
        return lambda: records.latest(which, 100)

    def bounded_text(text: str) -> Callable[[], list[dict]]:
        def search() -> list[dict]:
            floor = records.received_before(last, TEXT_MOST_ROWS)
            return records.latest(AuditFilter(since=floor, until=last, text=text), 100)

        return search

    return {
        "newest": latest(AuditFilter()),
        "user": latest(AuditFilter(user="user1234")),
        "chat": latest(AuditFilter(chat="chat123")),
        "route": latest(AuditFilter(route="legal")),
        "outcome (rare)": latest(AuditFilter(outcome=BLOCKED)),
        "bot and outcome": latest(AuditFilter(bot="hr", outcome=STOPPED)),
        "a day": latest(AuditFilter(since=last - timedelta(days=1), until=last)),
        "text found at once": bounded_text("公积金"),
        "text found nowhere: the newest 40,000 rows read (the page's most)": bounded_text("问题 1"),
        "text, one user, all time": latest(AuditFilter(user="user1234", text="公积金")),
        "text, all time (audit export only)": latest(AuditFilter(text="问题 123456")),
    }


def audit_search(server_url: str, rows: int, repeats: int) -> dict:
    url = database(server_url, "bench_admin")
    engine = db.make_engine(url)
    ensure_table(engine)
    records = AuditRecords(engine)
    started = time.monotonic()
    last = seed(records, rows, random.Random(7))
    seeded = time.monotonic() - started
    figures = {}
    for name, search in searches(records, last).items():
        times, found = [], 0
        try:
            for _ in range(repeats):
                began = time.perf_counter()
                found = len(search())
                times.append((time.perf_counter() - began) * 1000)
        except OperationalError:  # past the engine's 5 s read timeout, as the page's would be
            figures[name] = {"timed_out_after_s": 5, "runs_before": len(times)}
            continue
        figures[name] = {
            "rows_found": found,
            "p50_ms": round(statistics.median(times), 1),
            "p95_ms": round(harness.percentile(times, 95), 1),
        }
        print(name, figures[name], flush=True)
    engine.dispose()
    return {"rows": rows, "seed_seconds": round(seeded, 1), "searches": figures}


def live_view(answers: int, other_keys: int, repeats: int) -> dict:
    server = PrivateRedisServer().start()
    try:
        client = server.client()
        keys = Keys("bench:")
        pipe = client.pipeline(transaction=False)
        now = time.time()
        for i in range(other_keys):
            pipe.set(f"bench:other:{i}", "x")
            if i % 5000 == 4999:
                pipe.execute()
        for i in range(answers):
            stream_id = f"s{i:06d}"
            fields = {F.status: "streaming", F.userid: f"user{i}", F.chatid: "", F.owner: "replica-a:1#1"}
            fields |= {F.created_at: now - i % 300, F.text: "一段回答，" * 40, F.backend: "dify"}
            pipe.hset(keys.stream(stream_id), mapping=fields)
            pipe.zadd(keys.live_answers(), {stream_id: now - i % 300})
        pipe.execute()
        live = LiveAnswers(client, keys, "bench")
        inspector = StreamInspector(client, keys)

        def measured(call) -> tuple[float, float, int]:
            before = client.info("stats")["total_commands_processed"]
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                listed = call()
                times.append((time.perf_counter() - began) * 1000)
            commands = (client.info("stats")["total_commands_processed"] - before - 1) / repeats
            return statistics.median(times), commands, len(listed)

        started = time.perf_counter()
        for i in range(repeats * 100):  # what each message pays for the list: its entry as it opens and as it ends
            live.opened(f"m{i}", now)
            live.ended(f"m{i}")
        per_message_ms = (time.perf_counter() - started) * 1000 / (repeats * 100)
        live_ms, live_commands, listed = measured(live.now)
        scan_ms, scan_commands, scanned = measured(lambda: inspector.list("streaming", "", answers))
        return {
            "answers": answers,
            "other_keys": other_keys,
            "live_view": {"ms": round(live_ms, 1), "redis_commands": round(live_commands), "listed": listed},
            "listing_per_message_ms": round(per_message_ms, 3),
            "scan_of_the_keyspace": {
                "ms": round(scan_ms, 1),
                "redis_commands": round(scan_commands),
                "listed": scanned,
            },
        }
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--answers", type=int, default=1000)
    parser.add_argument("--other-keys", type=int, default=200_000)
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    result = {"live": live_view(options.answers, options.other_keys, options.repeats)}
    mariadb = PrivateMariaDB().start()
    try:
        result["audit_search"] = audit_search(mariadb.url, options.rows, options.repeats)
    finally:
        mariadb.remove()
    result["machine"] = harness.machine()
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
