"""How long a chatflow answer whose replica was killed takes to go on elsewhere (BENCHMARKS.md §9).

Per kill: a gateway replica (gunicorn) opens a chatflow answer that streams for `--answer-seconds`; once the
bubble shows some of it, the replica is SIGKILLed (master and workers). WeCom's polls, `--poll-interval` apart,
then go to a second replica, which takes the stream over once its lease has run out and follows the Dify run again.
Measured: from the kill to the takeover (the poll that finds the lease gone and resumes the run: target within the
lease period and the take-over grace plus one poll), to the first poll whose bubble shows more than at the kill,
whether the finished bubble holds the exact answer, and whether every poll's bubble began with the one before
(nothing withdrawn, no text after a hole: Dify relays only what a run publishes once one listens, so a resumed
answer holds what comes until it can be placed, at the run's end).

    python -m bench.resume --kills 10
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench import harness
from demo import dify_apps as apps
from demo import dify_standin as d
from services.keys import Keys

KEYS = Keys()


def chatflow_steps(words: list[str], gap: float) -> list[tuple]:
    steps: list[tuple] = [apps.workflow_started()]
    for word in words:
        steps += [d.message(word), d.sleep(gap)]
    return [*steps, apps.workflow_done({"answer": "".join(words)}), d.end()]


def one_kill(env: harness.Environment, survivor, number: int, options) -> dict:
    words = [f"w{number}-{i} " for i in range(int(options.answer_seconds / 0.1))]
    env.dify.script(chatflow_steps(words, 0.1), match=f"resume {number}")
    extra = {
        "STREAM_LEASE_SECONDS": str(options.lease),
        "STREAM_TAKEOVER_GRACE_SECONDS": str(options.grace),
        "DIFY_APP_TYPE": "advanced-chat",
    }
    owner = env.start_gateway(f"owner-{number}", workers=1, **extra)
    sim = env.simulator(owner.url, poll_interval=options.poll_interval)
    first = sim.send(sim.text_message(f"resume {number}", userid=f"user{number}"))
    stream_id = first["stream"]["id"]
    shown = ""
    while len(shown) < len(words[0]) * 5:  # a few words in the bubble
        time.sleep(0.1)
        shown = sim.send(sim.poll_message(stream_id, userid=f"user{number}"))["stream"]["content"]
    env.stop_gateway(owner)  # SIGKILL, master and workers
    killed, killed_at = time.monotonic(), time.time()
    sim.close()
    sim = env.simulator(survivor.url, poll_interval=options.poll_interval)
    resumed_after = None
    polls = 0
    contents = [shown]
    while True:
        time.sleep(options.poll_interval)
        reply = sim.send(sim.poll_message(stream_id, userid=f"user{number}"))["stream"]
        polls += 1
        contents.append(reply["content"])
        if resumed_after is None and len(reply["content"]) > len(shown) and reply["content"].startswith(shown):
            resumed_after = time.monotonic() - killed
        if reply["finish"]:
            break
        if time.monotonic() - killed > options.answer_seconds + options.lease + 60:
            raise RuntimeError(f"stream {stream_id} did not finish")
    sim.close()
    resumed_at = env.redis.client().hget(KEYS.stream(stream_id), "resumed_at")
    return {
        "taken_over_after_s": round(float(resumed_at) - killed_at, 2) if resumed_at else None,
        "resumed_after_s": round(resumed_after, 2) if resumed_after is not None else None,
        "exact": reply["content"] == "".join(words),
        "only_grew": all(later.startswith(earlier) for earlier, later in zip(contents, contents[1:], strict=False)),
        "polls_after_kill": polls,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--lease", type=int, default=15, help="STREAM_LEASE_SECONDS (the default)")
    parser.add_argument("--grace", type=float, default=3.0, help="STREAM_TAKEOVER_GRACE_SECONDS (the default)")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="WeCom polls about once a second")
    parser.add_argument("--answer-seconds", type=float, default=20.0)
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    started = time.time()
    env = harness.start_environment()
    env.dify.mode = "advanced-chat"
    survivor = env.start_gateway(
        "survivor",
        workers=2,
        STREAM_LEASE_SECONDS=str(options.lease),
        STREAM_TAKEOVER_GRACE_SECONDS=str(options.grace),
        DIFY_APP_TYPE="advanced-chat",
    )
    kills = []
    try:
        for number in range(options.kills):
            kills.append(one_kill(env, survivor, number, options))
    finally:
        env.close()
    times = [k["taken_over_after_s"] for k in kills if k["taken_over_after_s"] is not None]
    shown = [k["resumed_after_s"] for k in kills if k["resumed_after_s"] is not None]
    target = options.lease + options.grace + options.poll_interval  # a lease found gone is taken after the grace
    result = {
        "kills": options.kills,
        "lease_s": options.lease,
        "grace_s": options.grace,
        "poll_interval_s": options.poll_interval,
        "target_s": target,
        "taken_over_after_s": [k["taken_over_after_s"] for k in kills],
        "taken_over_median_s": round(statistics.median(times), 2) if times else None,
        "taken_over_max_s": max(times) if times else None,
        "within_target": sum(1 for t in times if t <= target),
        "new_text_after_s": shown,
        "new_text_median_s": round(statistics.median(shown), 2) if shown else None,
        "exact_answers": sum(1 for k in kills if k["exact"]),
        "bubbles_that_only_grew": sum(1 for k in kills if k["only_grew"]),
        "seconds": round(time.time() - started, 1),
        "machine": harness.machine(),
    }
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
