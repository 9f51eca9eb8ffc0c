"""The content rules' cost (BENCHMARKS.md §18):

1. in this process: an answer of `--answer-chars` characters streamed as deltas of a few characters through an
   answer's ContentMask with `--rules` rules (words, and `--patterns` of them regular expressions), against the same
   deltas with no rules: the time each delta adds;
2. under gunicorn: poll throughput (wrk) with CONTENT_RULES_FILE set and not, in alternating rounds of one run,
   while `--live` answers stream at 30 deltas/s (polls never run the rules: the answers' text does).

    python -m bench.content_rules --rules 10000 --patterns 20 --seconds 10 --rounds 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from bench import harness
from bench.poll_load import open_streams
from services.rules.mask import ContentMask
from services.rules.rules import parse

WORDS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自"
    "二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变"
    "条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指"
    "几九区强放决西被干做必战先回则任取据处理"
)


def rules_file(path: Path, count: int, patterns: int, rng: random.Random) -> None:
    """`count` rules: Chinese words of 2 to 6 characters and English phrases, `patterns` of them regular expressions."""
    lines = [f"re:\\b{rng.randint(100, 999)}-\\d{{{rng.randint(3, 5)}}}-\\d{{4}}\\b" for _ in range(patterns)]
    words: set[str] = set()
    while len(words) < count - patterns:
        if rng.random() < 0.8:
            words.add("".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))))
        else:
            words.add(f"project {rng.choice(('alpha', 'zeta', 'falcon'))} {rng.randint(1, 9999)}")
    path.write_text("\n".join(lines + sorted(words)) + "\n", encoding="utf-8")


def per_delta(rules_path: Path, answer_chars: int, rng: random.Random) -> dict:
    """Microseconds per delta through a ContentMask with the rules, and with none (the same deltas)."""
    rules = parse(rules_path.read_text(encoding="utf-8"), str(rules_path))
    text = "".join(rng.choice(WORDS + "，。 abc") for _ in range(answer_chars))
    deltas, at = [], 0
    while at < len(text):
        size = rng.randint(1, 6)
        deltas.append(text[at : at + size])
        at += size
    timings = {}
    for name, mask in (("none", ContentMask()), ("rules", ContentMask(rules))):
        started = time.perf_counter()
        out = "".join(mask.admit(delta) for delta in deltas) + mask.flush()
        timings[name] = (time.perf_counter() - started) / len(deltas) * 1e6
        assert len(out) == len(text)
    return {
        "rules": len(rules),
        "deltas": len(deltas),
        "us_per_delta_with_rules": round(timings["rules"], 1),
        "us_per_delta_without": round(timings["none"], 2),
        "us_added_per_delta": round(timings["rules"] - timings["none"], 1),
    }


def polls(env: harness.Environment, rules_path: Path, options) -> dict:
    """Poll throughput with the rules file and without, alternating rounds, answers streaming meanwhile."""
    samples: dict[str, list[float]] = {"on": [], "off": []}
    for round_number in range(options.rounds):
        for mode in ("off", "on"):
            extra = {"CONTENT_RULES_FILE": str(rules_path)} if mode == "on" else {}
            gateway = env.start_gateway(f"rules-{mode}-{round_number}", **extra)
            try:
                live, finished = open_streams(env, gateway.url, options.live, 50, options.seconds * 2 + 20, 30.0)
                sim = env.simulator(gateway.url)
                result = harness.wrk(gateway.url, harness.signed_polls(sim, live + finished, 2000), options.seconds, 16)
                sim.close()
            finally:
                env.stop_gateway(gateway)
            samples[mode].append(result.rate)
            print(f"round {round_number} rules {mode}: {result.rate:.0f} polls/s", file=sys.stderr)
    ratios = [on / off for on, off in zip(samples["on"], samples["off"], strict=True)]
    return {
        "polls_per_s_on": statistics.median(samples["on"]),
        "polls_per_s_off": statistics.median(samples["off"]),
        "polls_ratio_on_to_off": round(statistics.median(ratios), 3),
        "polls_ratio_by_round": [round(r, 3) for r in ratios],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--patterns", type=int, default=20)
    parser.add_argument("--answer-chars", type=int, default=20_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--live", type=int, default=20, help="answers streaming at 30 deltas/s during the polls")
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    rng = random.Random(7)
    env = harness.start_environment()
    try:
        path = env.log_dir / "rules.txt"
        rules_file(path, options.rules, options.patterns, rng)
        result = {"per_delta": per_delta(path, options.answer_chars, rng), "polls": polls(env, path, options)}
        result["machine"] = harness.machine()
    finally:
        env.close()
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
