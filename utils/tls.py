"""The TLS settings of every outgoing HTTPS call (Dify, the auth API, WeCom's media and response_url): one context
per process, trusting the system's certificate store (so an enterprise CA installed there, or named by
SSL_CERT_FILE, is trusted). A context holds the parsed store, about 0.8 MB: one per HTTP client would cost a few
MB per bot and worker (BENCHMARKS.md §8)."""

from __future__ import annotations

import functools
import ssl


@functools.cache
def default_tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()
