"""`python -m demo.serve`: the gateway in demo mode on the development server (stand-ins and console included),
without the terminal chat; talk to it from the console page or `python -m demo.wecom_simulator`."""

from __future__ import annotations

import signal
import sys

from demo.app import announce, create_app
from services import metrics


def main() -> None:
    # SIGTERM (a terminal closed, a test ending the demo) exits through atexit, which removes the embedded store's
    # port file, so the next demo does not look for this one.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = create_app()
    app.extensions["gateway"].start()
    settings = app.extensions["gateway"].settings
    if settings.metrics_port:
        metrics.serve(settings.host, settings.metrics_port)
    announce(app.extensions["gateway"], f"http://{settings.host}:{settings.port}")
    print(f"Console: http://{settings.host}:{settings.port}/console")
    if settings.admin_token:
        print(f"Operator's page: http://{settings.host}:{settings.port}/admin/ (the token is ADMIN_TOKEN in demo.env)")
    app.run(host=settings.host, port=settings.port, threaded=True)


if __name__ == "__main__":
    main()
