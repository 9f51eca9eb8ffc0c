"""Where a poll's time goes: call the WSGI apps directly (no sockets, no gunicorn) with pre-built requests, time
the gateway's poll against the protocol floor and the bare Flask constant (bench/bare_app.py), and optionally
profile the gateway with cProfile.

    python -m bench.profile_poll --polls 20000 [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from urllib.parse import parse_qsl, urlsplit

from werkzeug.test import EnvironBuilder

from app import create_app
from bench import bare_app, harness
from config.settings import Settings
from demo import dify_standin as d


def environs(requests: list[tuple[str, bytes]]) -> list[dict]:
    """WSGI environs for the requests; each keeps its body in "_body" so `run` can replay it."""
    built = []
    for path, body in requests:
        parts = urlsplit(path)
        builder = EnvironBuilder(
            path=parts.path,
            method="POST",
            query_string=dict(parse_qsl(parts.query)),
            data=body,
            content_type="application/json",
        )
        environ = builder.get_environ()
        environ["_body"] = body
        built.append(environ)
    return built


def run(app, environ_list: list[dict], count: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per request, calling the WSGI app `count` times."""

    def start_response(status, headers, exc_info=None):
        return None

    started, cpu = time.perf_counter(), time.process_time()
    for i in range(count):
        environ = dict(environ_list[i % len(environ_list)])
        environ["wsgi.input"] = io.BytesIO(environ["_body"])
        b"".join(app(environ, start_response))
    return (time.perf_counter() - started) / count, (time.process_time() - cpu) / count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="cumulative", help="pstats sort key, e.g. tottime")
    options = parser.parse_args(argv)
    env = harness.start_environment()
    try:
        settings = Settings.of(
            wecom_token=harness.TOKEN,
            wecom_encoding_aes_key=harness.AES_KEY,
            dify_base_url=env.dify.base_url,
            dify_api_key=harness.DIFY_KEY,
            redis_url=env.redis.url,
            auth_mode="none",
            log_level="WARNING",
        )
        app = create_app(settings)
        client = app.test_client()
        sim = env.simulator("http://unused")
        env.dify.script(d.answer("A finished answer of moderate length. " * 20), times=None)
        stream_ids = []
        for i in range(20):
            query, body = sim.envelope(sim.text_message("q", userid=f"u{i}"))
            reply = client.post(harness.CALLBACK, query_string=query, data=body).get_json()
            stream_ids.append(sim.open_reply(reply, query["nonce"])["stream"]["id"])
        time.sleep(1.0)
        requests = harness.signed_polls(sim, stream_ids, 2000)
        polls = environs(requests)
        os.environ.update(REDIS_URL=env.redis.url, WECOM_TOKEN=harness.TOKEN, WECOM_ENCODING_AES_KEY=harness.AES_KEY)
        apps = {
            "gateway poll": app,
            "protocol floor": bare_app.create_protocol_floor_app(),
            "bare Flask": bare_app.create_app(),
        }
        for each in apps.values():
            run(each, polls, 500)
        for _ in range(options.rounds):
            timings = {name: run(each, polls, options.polls) for name, each in apps.items()}
            print(
                "; ".join(
                    f"{name}: {wall * 1e6:.0f} us wall, {cpu * 1e6:.0f} us CPU" for name, (wall, cpu) in timings.items()
                )
            )
        if options.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            run(app, polls, options.polls)
            profiler.disable()
            stats = pstats.Stats(profiler).sort_stats(options.sort)
            stats.print_stats(45)
        sim.close()
        app.extensions["gateway"].close()
    finally:
        env.close()


if __name__ == "__main__":
    main()
