"""`python -m demo.standins`: run the Dify and auth API stand-ins as one long-lived service (a test cluster's
stand-ins for Dify and the auth API; see k8s/overlays/test-cluster)."""

from __future__ import annotations

import argparse
import signal
import threading

from demo.auth_standin import AuthStandIn
from demo.dify_standin import DifyStandIn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Dify and auth API stand-ins.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--dify-port", type=int, default=5001)
    parser.add_argument("--auth-port", type=int, default=8000)
    parser.add_argument("--dify-api-key", default=None, help="require this Dify key (default: accept any)")
    parser.add_argument("--auth-api-key", default="test-auth-key")
    options = parser.parse_args(argv)
    dify = DifyStandIn(api_key=options.dify_api_key, host=options.host, port=options.dify_port).start()
    auth = AuthStandIn(api_key=options.auth_api_key, host=options.host, port=options.auth_port).start()
    print(f"Dify stand-in on {dify.base_url}, auth API stand-in on {auth.url}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    dify.stop()
    auth.stop()


if __name__ == "__main__":
    main()
