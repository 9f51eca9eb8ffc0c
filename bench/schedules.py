"""Schedules (BENCHMARKS.md §24): `--schedules` every-minute schedules of one bot, each pushing to a group robot of
its own, run by `--replicas` gunicorn replicas (`--workers` each: every worker's scheduler races for every tick),
Dify and WeCom's webhook played by their stand-ins, over `--ticks` minutes on the real clock.

Measured: each tick claimed once (the ticks' records in Redis, the Dify calls, the messages the robots took: none
missing, none twice); how late a tick was claimed after its time, and its answer pushed (p50 / p99 / max); then,
with `--idle-seconds`, the scheduler's idle cost: the CPU the replicas' workers use over that long with the same
number of schedules that never fire (cron `0 0 1 1 *`), against the same replicas with none; and, with
`--webhook-pushes`, the push API hammering one robot from every replica for a minute and more: the messages the
robot took in any minute (WeCom's 20 at most), and the 429s.

    python -m bench.schedules --schedules 1000 --replicas 3 --ticks 2 --idle-seconds 60 --webhook-pushes 200
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import httpx
import redis

from bench import harness
from bench.harness import AES_KEY, DIFY_KEY, TOKEN
from demo import dify_standin as d
from demo.wecom_api_standin import WeComApiStandIn

PUSH_TOKEN = "bench-schedules-push-token-0123"
PREFIX = "bot:reports:"


def bots_file(path: Path, schedules: int, cron: str, wecom: WeComApiStandIn, dify_url: str) -> None:
    lines = [
        "[bots.reports]",
        f'token = "{TOKEN}"',
        f'encoding_aes_key = "{AES_KEY}"',
        f'dify_base_url = "{dify_url}"',
        f'dify_api_key = "{DIFY_KEY}"',
        "[bots.reports.webhooks]",
        *[f'r{n} = "{wecom.webhook_url(f"robot-{n}")}"' for n in range(max(schedules, 1))],
    ]
    for n in range(schedules):
        lines += [
            "[[bots.reports.schedules]]",
            f'name = "s{n}"',
            f'cron = "{cron}"',
            f'question = "report {n} {{datetime}}"',
            f'to = ["webhook:r{n}"]',
        ]
    path.write_text("\n".join(lines) + "\n")


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU seconds the processes used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def workers_of(replicas) -> list[int]:
    """The pids of the replicas' gunicorn workers (the master's children)."""
    found = []
    for replica in replicas:
        children = Path(f"/proc/{replica.process.pid}/task/{replica.process.pid}/children").read_text().split()
        found += [int(pid) for pid in children]
    return found


def start(env, options, path: Path, wecom: WeComApiStandIn, **extra: str):
    replicas = [
        env.start_gateway(
            f"sched-{i}",
            workers=options.workers,
            BOTS_FILE=str(path),
            WECOM_API_BASE=wecom.url,
            PUSH_API_TOKEN=PUSH_TOKEN,
            **extra,
        )
        for i in range(options.replicas)
    ]
    return replicas


def firing(env, options, wecom: WeComApiStandIn, folder: Path) -> dict:
    """Every-minute schedules over `options.ticks` minutes: once each, and how late."""
    path = folder / "bots.toml"
    bots_file(path, options.schedules, "* * * * *", wecom, env.dify.base_url)
    env.dify.script(d.answer("the report"), times=None)
    replicas = start(env, options, path, wecom)
    client = redis.Redis.from_url(env.redis.url, decode_responses=True)
    began = time.time()
    first = (int(began) // 60 + 1) * 60
    if first - began < 5:  # the schedulers see the schedules before the first tick they count
        first += 60
    ticks = [first + 60 * n for n in range(options.ticks)]
    time.sleep(max(0.0, ticks[-1] + 30 - time.time()))
    claimed, late_claims, late_pushes, duplicates, earlier = 0, [], [], 0, 0
    candidates = [tick for tick in range(first - 180, ticks[-1] + 60, 60)]  # (a tick may fall while they start)
    for n in range(options.schedules):
        ran = []
        for tick in candidates:
            record = client.hgetall(f"{PREFIX}schedule:{{{PREFIX}schedules}}:s{n}:{tick}")
            if record:
                ran.append(tick)
                claimed += tick in ticks
                earlier += tick < first
                late_claims.append(float(record["claimed_at"]) - tick)
        sent = sorted(s.at for s in wecom.sent if s.key == f"robot-{n}")
        duplicates += max(0, len(sent) - len(ran))
        late_pushes += [at - tick for at, tick in zip(sent, ran, strict=False)]
    questions = [r["body"].get("query", "") for r in env.dify.requests if isinstance(r["body"], dict)]
    for replica in replicas:
        env.stop_gateway(replica)
    client.close()
    return {
        "schedules": options.schedules,
        "ticks": len(ticks),
        "ticks_claimed": claimed,
        "ticks_expected": options.schedules * len(ticks),
        "ticks_before_the_measured_ones": earlier,  # (one fell while the replicas started: run once too)
        "dify_calls": len(questions),
        "dify_calls_distinct": len(set(questions)),
        "robot_messages": len(wecom.sent),
        "robot_messages_twice": duplicates,
        "claim_late_p50_s": round(harness.percentile(late_claims, 50), 3),
        "claim_late_p99_s": round(harness.percentile(late_claims, 99), 3),
        "claim_late_max_s": round(max(late_claims, default=0.0), 3),
        "pushed_late_p50_s": round(harness.percentile(late_pushes, 50), 3),
        "pushed_late_p99_s": round(harness.percentile(late_pushes, 99), 3),
        "pushed_late_max_s": round(max(late_pushes, default=0.0), 3),
    }


def idle(env, options, wecom: WeComApiStandIn, folder: Path) -> dict:
    """The replicas' CPU over `options.idle_seconds` with schedules that never fire, and with none."""
    found = {}
    for label, count in (("without_schedules", 0), ("with_schedules", options.schedules)):
        path = folder / f"idle-{label}.toml"
        bots_file(path, count, "0 0 1 1 *", wecom, env.dify.base_url)
        replicas = start(env, options, path, wecom)
        time.sleep(10)  # start-up settles
        pids = workers_of(replicas)
        before, started = cpu_seconds(pids), time.monotonic()
        time.sleep(options.idle_seconds)
        used = cpu_seconds(pids) - before
        found[f"cpu_percent_per_replica_{label}"] = round(100 * used / (time.monotonic() - started) / len(replicas), 2)
        for replica in replicas:
            env.stop_gateway(replica)
    found["idle_seconds"] = options.idle_seconds
    return found


def webhook_limit(env, options, wecom: WeComApiStandIn, folder: Path) -> dict:
    """`options.webhook_pushes` pushes to one robot through every replica, as fast as they are taken."""
    path = folder / "limit.toml"
    bots_file(path, 0, "* * * * *", wecom, env.dify.base_url)
    replicas = start(env, options, path, wecom)
    wecom.sent.clear()
    answers: dict[int | str, int] = {}
    lock = threading.Lock()
    began = time.monotonic()

    def push(number: int) -> None:
        replica = replicas[number % len(replicas)]
        body = {"bot": "reports", "webhook": "r0", "text": f"alert {number}"}
        headers = {"Authorization": f"Bearer {PUSH_TOKEN}"}
        while True:
            status = httpx.post(f"{replica.url}/api/push", json=body, headers=headers, timeout=30)
            said = status.status_code if status.status_code != 200 else f"200 {status.json().get('status')}"
            with lock:
                answers[said] = answers.get(said, 0) + 1
            if status.status_code != 429:
                return
            time.sleep(min(5.0, float(status.headers.get("retry-after", "1"))))

    threads = [threading.Thread(target=push, args=(n,)) for n in range(options.webhook_pushes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    times = sorted(s.at for s in wecom.sent)
    most_in_a_minute = max((sum(1 for t in times if start <= t < start + 60) for start in times), default=0)
    for replica in replicas:
        env.stop_gateway(replica)
    return {
        "webhook_pushes": options.webhook_pushes,
        "robot_took": len(times),
        "robot_most_in_any_minute": most_in_a_minute,
        "answers": {str(code): count for code, count in sorted(answers.items(), key=str)},
        "seconds": round(elapsed, 1),
        "pushes_per_second": round(len(times) / elapsed, 3),
    }


def run(options) -> dict:
    env = harness.start_environment()
    keys = tuple(f"robot-{n}" for n in range(max(options.schedules, 1)))
    wecom = WeComApiStandIn(keys=keys).start()
    folder = env.log_dir
    result: dict = {"machine": harness.machine(), "replicas": options.replicas, "workers": options.workers}
    try:
        if options.ticks:
            result["firing"] = firing(env, options, wecom, folder)
        if options.idle_seconds:
            result["idle"] = idle(env, options, wecom, folder)
        if options.webhook_pushes:
            result["webhook_limit"] = webhook_limit(env, options, wecom, folder)
    finally:
        wecom.stop()
        env.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedules", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--ticks", type=int, default=2)
    parser.add_argument("--idle-seconds", type=float, default=0.0)
    parser.add_argument("--webhook-pushes", type=int, default=0)
    parser.add_argument("--json")
    options = parser.parse_args()
    harness.report(run(options), options.json)


if __name__ == "__main__":
    main()
