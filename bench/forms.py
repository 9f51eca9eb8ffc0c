"""How fast a tap on a form's card is answered, with many forms open (BENCHMARKS.md §12).

`--forms` chatflow answers (one user each, spread over two gateway replicas under gunicorn) pause at a Human Input
node; every bubble is polled like WeCom until its card arrives, so that many forms wait at once, each held by its
stream's worker. Then each card is tapped on the *other* replica, `--rate` taps a second, and two things are timed
per tap: the click's round trip (the template_card_event to its update_template_card reply: WeCom drops a click
left unanswered 5 s; target p99 < 1 s), and the tap to the first poll whose bubble shows the rest of the run (the
worker's claim check, the submission, the re-attach to Dify and the first delta; polls `--poll-interval` apart
bound its resolution).

    python -m bench.forms --forms 200 --json forms.json
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bench import harness
from demo import dify_apps as apps
from demo import dify_standin as d

REST = " The request was handled."


def open_forms(env: harness.Environment, replicas, count: int) -> list[tuple[int, str]]:
    """Open `count` answers that pause at a form; (replica index, stream id) of each."""
    sims = [env.simulator(r.url) for r in replicas]
    opened = []
    for number in range(count):
        index = number % len(replicas)
        sim = sims[index]
        first = sim.send(sim.text_message(f"form {number}", userid=f"user{number}"))
        opened.append((index, first["stream"]["id"]))
    for sim in sims:
        sim.close()
    return opened


def wait_for_cards(env: harness.Environment, replicas, opened, poll_interval: float) -> dict[str, dict]:
    """Poll every bubble like WeCom until its card arrives; stream id -> card."""
    cards: dict[str, dict] = {}
    lock = threading.Lock()

    def follow(item) -> None:
        number, (index, stream_id) = item
        sim = env.simulator(replicas[index].url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            reply = sim.send(sim.poll_message(stream_id, userid=f"user{number}"))
            if "template_card" in reply:
                with lock:
                    cards[stream_id] = reply["template_card"]
                break
            time.sleep(poll_interval)
        sim.close()

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(follow, enumerate(opened)))
    return cards


def tap_all(env, replicas, opened, cards, rate: float, poll_interval: float) -> tuple[list[float], list[float], int]:
    """Tap each card on the other replica at `rate` a second; (click round trips, tap to first rest, failures)."""
    clicks, rests, failures = [], [], []
    lock = threading.Lock()
    started = time.monotonic()

    def tap(item) -> None:
        number, (index, stream_id) = item
        time.sleep(max(0.0, started + number / rate - time.monotonic()))  # open loop: a tap every 1/rate s
        other = replicas[(index + 1) % len(replicas)]
        sim = env.simulator(other.url)
        sent = time.perf_counter()
        reply = sim.send(sim.card_click(cards[stream_id], "approve", userid=f"user{number}"))
        clicked = time.perf_counter() - sent
        shown = None
        while time.perf_counter() - sent < 30:
            content = sim.send(sim.poll_message(stream_id, userid=f"user{number}"))["stream"]["content"]
            if REST.strip() in content:
                shown = time.perf_counter() - sent
                break
            time.sleep(poll_interval)
        sim.close()
        with lock:
            if not reply or reply.get("response_type") != "update_template_card" or shown is None:
                failures.append(stream_id)
            clicks.append(clicked)
            if shown is not None:
                rests.append(shown)

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(tap, [(n, item) for n, item in enumerate(opened) if item[1] in cards]))
    return clicks, rests, len(failures)


def summary(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {
        "p50_ms": round(harness.percentile(ms, 50), 1),
        "p99_ms": round(harness.percentile(ms, 99), 1),
        "max_ms": round(max(ms), 1) if ms else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forms", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="taps a second")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="WeCom's polls while the cards arrive")
    parser.add_argument("--rest-poll-interval", type=float, default=0.05, help="polls after a tap, for its timing")
    parser.add_argument("--json")
    harness.add_gunicorn_arguments(parser)
    options = parser.parse_args(argv)
    env = harness.start_environment()
    try:
        branch = [d.message(REST), apps.workflow_done({"answer": REST}), d.end()]
        env.dify.script(
            [apps.workflow_started(), d.message("Need approval."), apps.form(branches={"*": branch})], times=None
        )
        replicas = [env.start_gateway(f"replica-{n}", workers=options.workers) for n in range(2)]
        began = time.monotonic()
        opened = open_forms(env, replicas, options.forms)
        cards = wait_for_cards(env, replicas, opened, options.poll_interval)
        open_seconds = time.monotonic() - began
        clicks, rests, failures = tap_all(env, replicas, opened, cards, options.rate, options.rest_poll_interval)
        result = {
            "benchmark": "forms",
            "machine": harness.machine(),
            "replicas": 2,
            "workers_per_replica": options.workers,
            "forms_open": len(cards),
            "seconds_to_open_them": round(open_seconds, 1),
            "tap_rate_per_s": options.rate,
            "click_to_card_update": summary(clicks),
            "click_to_first_text_of_the_rest": summary(rests),
            "failures": failures,
            "submissions": len(env.dify.form_submissions),
        }
    finally:
        env.close()
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
