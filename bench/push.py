"""The push API (BENCHMARKS.md §12): `--pushes` messages to `--chats` chats through `--replicas` gunicorn replicas
(2 workers each) of one long-connection bot, WeCom played by the WebSocket stand-in. Requests go round-robin to the
replicas from `--clients` threads, each with its own Idempotency-Key; with `--kill-holder` the replica holding the
connection is SIGKILLed once a third of them are accepted (the next holder sends the rest).

Measured: the API's answers (202s, 429s, errors) and their latency; the messages WeCom received, each checked
once (none missing, none twice); the latency from a push's 202 to its frame reaching WeCom (p50 / p99).

    python -m bench.push --pushes 1000 --chats 50
    python -m bench.push --pushes 1000 --chats 50 --kill-holder
"""

from __future__ import annotations

import argparse
import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench import harness
from bench.longconn import BOT_ID, SECRET, holder_of, settings, wait_for
from demo.wecom_ws_standin import WeComWebSocketStandIn

TOKEN = "bench-push-token-0123456789abcdef"


def run(options) -> dict:
    env = harness.start_environment()
    wecom = WeComWebSocketStandIn({BOT_ID: SECRET}, stamp_frames=True).start()
    extra = {**settings(wecom, options.lease), "PUSH_API_TOKEN": TOKEN}
    try:
        replicas = [env.start_gateway(f"push-{i}", workers=2, **extra) for i in range(options.replicas)]
        assert wait_for(lambda: wecom.subscribed(BOT_ID) == 1, 30), "no holder"
        holder = holder_of(env, replicas)
        accepted: dict[str, float] = {}  # markdown -> when its 202 came
        ids: dict[str, str] = {}  # markdown -> its push id
        answers: collections.Counter = collections.Counter()
        api_ms: list[float] = []
        lock = threading.Lock()
        killed = threading.Event()
        clients = [httpx.Client(timeout=30, trust_env=False) for _ in range(options.clients)]

        def push(number: int) -> None:
            replica = replicas[number % len(replicas)]
            if killed.is_set() and replica is holder:
                replica = next(r for r in replicas if r is not holder)
            markdown = f"push {number} to chat {number % options.chats}"
            body = {"bot": "default", "chatid": f"chat-{number % options.chats}", "markdown": markdown}
            headers = {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": f"bench-{number}"}
            started = time.monotonic()
            for _ in range(3):  # a request cut by the kill is sent again with its key: the same push
                try:
                    response = clients[number % len(clients)].post(
                        f"{replica.url}/api/push", json=body, headers=headers
                    )
                    break
                except httpx.TransportError:
                    replica = next(r for r in replicas if r is not holder)
            else:
                raise RuntimeError("the push API did not answer")
            took = (time.monotonic() - started) * 1000
            with lock:
                answers[response.status_code] += 1
                api_ms.append(took)
                if response.status_code in (200, 202):
                    accepted.setdefault(markdown, time.time())
                    ids[markdown] = response.json()["id"]
                if options.kill_holder and not killed.is_set() and len(accepted) >= options.pushes // 3:
                    killed.set()
                    env.stop_gateway(holder)

        started = time.monotonic()
        with ThreadPoolExecutor(options.clients) as pool:
            list(pool.map(push, range(options.pushes)))
        accepting = time.monotonic() - started
        wait_for(lambda: len(wecom.proactive) >= len(accepted), options.deliver_timeout)
        time.sleep(5)  # past two more outbox passes: a second copy would arrive by now
        received = collections.Counter(m["markdown"]["content"] for m in wecom.proactive)
        latencies = [
            (m["_received_at"] - accepted[m["markdown"]["content"]]) * 1000
            for m in wecom.proactive
            if m["markdown"]["content"] in accepted
        ]
        per_chat = collections.Counter(m["chatid"] for m in wecom.proactive)
        missing = [markdown for markdown in accepted if received[markdown] == 0]
        detail = {ids[markdown]: what_became_of(env, ids[markdown]) for markdown in missing[:5]}
        for client in clients:
            client.close()
    finally:
        wecom.stop()
        env.close()
    return {
        "pushes": options.pushes,
        "chats": options.chats,
        "replicas": options.replicas,
        "holder_killed": options.kill_holder,
        "answers": dict(answers),
        "accepted_per_s": round(len(accepted) / accepting, 1),
        "api_p50_ms": round(harness.percentile(api_ms, 50), 1),
        "api_p99_ms": round(harness.percentile(api_ms, 99), 1),
        "delivered_once": sum(1 for markdown in accepted if received[markdown] == 1),
        "missing": len(missing),
        "missing_detail": detail,
        "duplicates": sum(count - 1 for count in received.values() if count > 1),
        "refused_by_wecom": len(wecom.refused_sends),
        "most_to_one_chat": max(per_chat.values(), default=0),
        "to_frame_p50_ms": round(harness.percentile(latencies, 50), 1),
        "to_frame_p99_ms": round(harness.percentile(latencies, 99), 1),
    }


def what_became_of(env, push_id: str) -> dict:
    """A missing push's Redis state, to tell where it stopped."""
    client = env.redis.client()
    meta = client.hgetall(f"dify_stream:{{{push_id}}}")
    return {
        "stream": {k: v for k, v in meta.items() if k in ("status", "ws_dead", "ws_chat", "push", "send_refusals")},
        "outbox_marker": client.get(f"wecom_ws_outbox:{{{push_id}}}"),
        "in_open_set": client.zscore(f"wecom_ws:{{{BOT_ID}}}:open", push_id) is not None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pushes", type=int, default=1000)
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--lease", type=int, default=10, help="WECOM_WS_LEASE_SECONDS (the default)")
    parser.add_argument("--kill-holder", action="store_true")
    parser.add_argument("--deliver-timeout", type=float, default=180.0)
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    started = time.time()
    result = run(options)
    result.update(seconds=round(time.time() - started, 1), machine=harness.machine())
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
