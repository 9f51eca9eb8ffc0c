"""`python -m demo`: run the gateway on embedded defaults and chat with it in this terminal.

Starts the demo app (demo/app.py: the gateway plus its Dify and auth stand-ins) on the development server,
in-process, then opens the WeCom simulator's chat loop against it. Nothing external is needed: no WeCom account,
Redis, MySQL or Dify key.
"""

from __future__ import annotations

import threading
from pathlib import Path

from werkzeug.serving import make_server

from demo.app import create_app
from demo.wecom_simulator import WeComSimulator, chat_loop
from utils.logging import send_logs_to


def main() -> None:
    app = create_app()
    settings = app.extensions["gateway"].settings
    log_path = _log_to_file(Path(app.instance_path) / "demo.log")
    server = make_server(settings.host, settings.port, app, threaded=True)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    url = f"http://{settings.host}:{settings.port}"
    print(f"Gateway running at {url}{settings.wecom_callback_path} (demo mode).")
    print(f"Open the console in a browser to chat there too: {url}/console")
    print(f"The gateway's log (message, stream and Dify task ids, failures): {log_path}")
    simulator = WeComSimulator(
        url, settings.wecom_token, settings.wecom_encoding_aes_key, callback_path=settings.wecom_callback_path
    )
    try:
        chat_loop(simulator, "alice")
    finally:
        server.shutdown()


def _log_to_file(path: Path) -> Path:
    """Keep the chat readable: the gateway logs into `path` instead of this terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    send_logs_to(path.open("a", encoding="utf-8"))  # open for the life of the process
    return path


if __name__ == "__main__":
    main()
