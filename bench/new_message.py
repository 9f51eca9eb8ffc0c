"""New-message latency (BENCHMARKS.md §3): how fast a new text message callback is answered (the first stream
reply), with external auth and every user's token already cached, at a steady rate from many users.

    python -m bench.new_message --rate 50 --seconds 20
"""

from __future__ import annotations

import argparse
from urllib.parse import urlencode

import orjson

from bench import harness
from demo import dify_standin as d
from demo.auth_standin import AuthStandIn
from services.auth import db


def seed_tokens(client, users: list[str]) -> None:
    """Cache a token for every user, as the gateway does after a first exchange."""
    pipe = client.pipeline()
    for userid in users:
        token = f"tok_{userid}"
        pipe.set(f"authorization:wechatid:{userid}", token, ex=3600)
        pipe.set(
            f"authorization:token:{token}", orjson.dumps({"userid": userid, "account": userid, "user": {}}), ex=3600
        )
    pipe.execute()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50.0, help="new messages per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    env = harness.start_environment()
    auth = AuthStandIn(api_key="bench-auth").start()
    count = int(options.rate * options.seconds)
    users = [f"user{i}" for i in range(count)]
    try:
        seed_tokens(env.redis.client(), users)
        database_url = f"sqlite:///{env.log_dir}/users.db"
        db.init_schema(db.make_engine(database_url))  # the gateway is ready only once its user table exists
        gateway = env.start_gateway(
            "new-messages",
            AUTH_MODE="external",
            AUTH_API_URL=auth.url,
            AUTH_API_KEY="bench-auth",
            DATABASE_URL=database_url,
        )
        env.dify.script(d.answer("A short answer.", delay=0.05), times=None)
        sim = env.simulator(gateway.url)
        messages = []
        for userid in users:
            query, body = sim.envelope(sim.text_message("hello", userid=userid))
            messages.append((f"{harness.CALLBACK}?{urlencode(query)}", body))
        latency = harness.open_loop("127.0.0.1", gateway.port, messages, options.rate, options.seconds)
        sim.close()
    finally:
        auth.stop()
        env.close()
    result = {
        "rate": options.rate,
        "seconds": options.seconds,
        "auth": "external, tokens cached",
        "auth_api_calls": len(auth.calls),
        **latency.summary(),
        "machine": harness.machine(),
    }
    harness.report(result, options.json)
    return result


if __name__ == "__main__":
    main()
