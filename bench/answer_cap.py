"""The cap on a bot's answers running at once under load (BENCHMARKS.md §17): `--questions` questions sent within a
moment (`--spacing` apart, so that their order of arrival is known) over two gunicorn replicas with
MAX_ACTIVE_ANSWERS_PER_BOT=`--cap`, each answer taking `--answer-seconds`: the most Dify calls running at once (the
stand-in counts them), the order the calls started in against the order the questions arrived in, and the wait
each question saw before its call.

    python -m bench.answer_cap --questions 50 --cap 10 --answer-seconds 2
"""

from __future__ import annotations

import argparse
import threading
import time

from bench import harness
from demo import dify_standin as d


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--cap", type=int, default=10)
    parser.add_argument("--answer-seconds", type=float, default=2.0)
    parser.add_argument("--spacing", type=float, default=0.05, help="seconds between the questions' sends")
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    env = harness.start_environment(ping_interval=0.5)
    try:
        settings = {"MAX_ACTIVE_ANSWERS_PER_BOT": str(options.cap), "QUEUE_WAIT_SECONDS": "300"}
        replicas = [env.start_gateway(f"cap-{i}", **settings) for i in range(2)]
        env.dify.script([d.message("answered"), d.sleep(options.answer_seconds), d.end()], times=None)
        sims = [env.simulator(replica.url) for replica in replicas]
        sent_at: dict[str, float] = {}
        finals: dict[str, str] = {}
        barrier = threading.Barrier(options.questions)

        def ask(i: int) -> None:
            sim, query = sims[i % 2], f"question {i:03d}"
            payload = sim.text_message(query, userid=f"user{i}")
            barrier.wait()
            time.sleep(i * options.spacing)  # an order of arrival the line can be checked against
            first = sim.send(payload)
            sent_at[query] = time.time()
            finals[query] = sim.follow(first, userid=f"user{i}").text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(options.questions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for sim in sims:
            sim.close()
        started = {r["body"]["query"]: r["at"] for r in env.dify.requests}
    finally:
        env.close()
    arrival = sorted(sent_at, key=sent_at.get)
    call_order = sorted(started, key=started.get)
    waits = sorted(max(0.0, started[q] - sent_at[q]) for q in started)
    # How far each call started from its place in the line. Answers that take the same time end together, so the
    # line is let in a wave of `cap` at a time, whose calls race to Dify: first come, first served is each question
    # in the wave its place in the line puts it in.
    displacement = [abs(call_order.index(q) - arrival.index(q)) for q in started]
    wrong_wave = [q for q in started if call_order.index(q) // options.cap != arrival.index(q) // options.cap]
    result = {
        "questions": options.questions,
        "cap": options.cap,
        "answer_seconds": options.answer_seconds,
        "answered": sum(1 for text in finals.values() if text == "answered"),
        "dify_calls": len(started),
        "most_dify_calls_at_once": env.dify.most_answering,
        "calls_out_of_arrival_order": sum(1 for n in displacement if n),
        "calls_in_another_wave": len(wrong_wave),
        "largest_displacement": max(displacement, default=0),
        "wait_s": {
            "p50": round(harness.percentile(waits, 50), 2),
            "max": round(max(waits, default=0.0), 2),
            "first": round(waits[0], 2) if waits else None,
        },
        "machine": harness.machine(),
    }
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
