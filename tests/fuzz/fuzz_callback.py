"""Coverage-guided fuzzing of the callback endpoint with atheris (libFuzzer for Python).

    python -m tests.fuzz.fuzz_callback -max_total_time=60

Each input is split by a FuzzedDataProvider into one of three shapes: a raw request (query and body from the
fuzzer's bytes), a validly signed request around a fuzzed `encrypt` value, or a valid envelope around a fuzzed
plaintext message. The answer must pass tests/fuzz/checks.py; a violation or an unhandled exception is a crash.
The gateway runs in-process on the Redis named by FUZZ_REDIS_URL (the test Redis), with Dify unreachable (streams
end at once).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import atheris
import orjson

with atheris.instrument_imports(include=["app", "services", "utils", "config"]):
    from app import create_app
    from services.wecom.crypto import WeComCrypto

from tests.fuzz.checks import SECRETS, check, fuzz_settings

TOKEN, AES_KEY, _ = SECRETS
CRYPTO = WeComCrypto(TOKEN, AES_KEY, "")
APP = create_app(fuzz_settings(os.environ["FUZZ_REDIS_URL"], dify_connect_timeout=0.05))
logging.getLogger().setLevel(logging.CRITICAL)
CLIENT = APP.test_client()


def one_input(data: bytes) -> None:
    fuzz = atheris.FuzzedDataProvider(data)
    shape = fuzz.ConsumeIntInRange(0, 2)
    nonce = fuzz.ConsumeUnicodeNoSurrogates(12) or "n"
    timestamp = str(int(time.time()))
    if shape == 0:
        query = {
            "msg_signature": fuzz.ConsumeUnicodeNoSurrogates(48),
            "timestamp": fuzz.ConsumeUnicodeNoSurrogates(14),
            "nonce": nonce,
        }
        body = fuzz.ConsumeBytes(fuzz.ConsumeIntInRange(0, 400))
    else:
        if shape == 1:
            encrypted = fuzz.ConsumeUnicodeNoSurrogates(fuzz.ConsumeIntInRange(0, 300))
        else:
            encrypted = CRYPTO.encrypt(fuzz.ConsumeUnicodeNoSurrogates(fuzz.ConsumeIntInRange(0, 400)))
        query = {"msg_signature": CRYPTO.sign(timestamp, nonce, encrypted), "timestamp": timestamp, "nonce": nonce}
        body = orjson.dumps({"encrypt": encrypted})
    response = CLIENT.post("/wecom/callback", query_string=query, data=body, content_type="application/json")
    check(response.status_code, response.get_data(), query.get("nonce"), CRYPTO)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
