"""WeCom's long-connection (WebSocket) mode (docs/configuration.md): one process across all replicas holds each bot's
connection (lease.py), moves its frames (session.py) and answers its messages through the same streams as callback
mode (holder.py, frames.py)."""
