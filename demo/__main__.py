"""`python -m demo [--bot NAME]`: run the gateway on embedded defaults and chat with one of its bots in this
terminal (the first of demo/bots.toml unless `--bot` names another).

Starts the demo app (demo/app.py: the gateway plus its Dify and auth stand-ins) on the development server,
in-process, then opens the WeCom simulator's chat loop against it. Nothing external is needed: no WeCom account,
Redis, MySQL or Dify key.
"""

from __future__ import annotations

import argparse
import socket
import threading
from pathlib import Path

from werkzeug.serving import make_server

from app import load_settings_or_exit
from config.settings import DEMO_ENV_FILES
from demo.app import announce, create_app
from demo.terminal_chat import chat_loop
from demo.wecom_simulator import WeComSimulator
from utils.logging import send_logs_to


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the gateway locally and chat with one of its bots.")
    parser.add_argument("--bot", default=None, help="the bot to chat with (default: the first)")
    options = parser.parse_args(argv)
    settings = load_settings_or_exit(DEMO_ENV_FILES)
    if not _port_is_free(settings.host, settings.port):
        bot = f" --bot {options.bot}" if options.bot else ""
        parser.exit(
            2,
            f"Port {settings.port} is in use: is a demo running already? Chat with it from another terminal with "
            f"`.venv/bin/python -m demo.wecom_simulator{bot}`, or start this one on another port: "
            f"`PORT=8081 .venv/bin/python -m demo{bot}`.\n",
        )
    app = create_app(settings)
    gateway = app.extensions["gateway"]
    if options.bot is not None and options.bot not in gateway.bots:
        parser.error(f"no bot {options.bot!r}: the bots are {', '.join(gateway.bots)}")
    if options.bot is not None and gateway.bots[options.bot].delivery.mode == "long_connection":
        parser.error(f"{options.bot!r} is a long-connection bot: chat with it in the console (/console)")
    callback_bots = [each for each in gateway.bots.values() if each.delivery.mode == "callback"]
    bot = gateway.bots[options.bot] if options.bot else callback_bots[0]
    gateway.start()
    log_path = _log_to_file(Path(app.instance_path) / "demo.log")
    server = make_server(settings.host, settings.port, app, threaded=True)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    url = f"http://{settings.host}:{settings.port}"
    announce(gateway, url)
    print(f"Open the console in a browser to chat there too: {url}/console")
    if settings.admin_token:
        print(f"The operator's page (sign in with ADMIN_TOKEN of demo.env and any name): {url}/admin/")
    print(f"The gateway's log (message, stream and Dify task ids, failures): {log_path}")
    simulator = WeComSimulator(
        url,
        bot.settings.wecom.token,
        bot.settings.wecom.encoding_aes_key,
        callback_path=bot.settings.wecom.callback_path,
        aibotid=f"demo-{bot.name}",
    )
    print(f"Chatting with {bot.name!r}{' (--bot picks another)' if len(gateway.bots) > 1 else ''}.")
    try:
        chat_loop(simulator, "alice")
    finally:
        server.shutdown()


def _port_is_free(host: str, port: int) -> bool:
    """Whether nothing listens on the port. SO_REUSEADDR, as the demo's own server binds: a demo stopped a moment
    ago leaves connections in TIME-WAIT there, which must not keep the next one from starting."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _log_to_file(path: Path) -> Path:
    """Keep the chat readable: the gateway logs into `path` instead of this terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    send_logs_to(path.open("a", encoding="utf-8"))  # open for the life of the process
    return path


if __name__ == "__main__":
    main()
