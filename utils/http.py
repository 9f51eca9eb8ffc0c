"""Every outgoing HTTP client of the gateway (Dify, the auth API, WeCom's media and response_url, Dify's files)
is made here, so they share what must not differ: proxies and certificates from settings only, never from the
environment (`trust_env=False`), and the process's one TLS context (utils/tls.py). What may differ is named at each
call: the timeouts, and whether redirects are followed (WeCom's media downloads are redirected to a CDN; a
Dify-signed file URL must never be, for a redirect would carry the fetch to a host nobody checked)."""

from __future__ import annotations

import ssl

import httpx

from utils.tls import default_tls_context


def outgoing_client(
    timeout: httpx.Timeout,
    *,
    follow_redirects: bool,
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
    **more,
) -> httpx.Client:
    """An httpx client with the gateway's fixed settings; `more` goes to httpx as it is (base_url, limits)."""
    return httpx.Client(
        timeout=timeout,
        follow_redirects=follow_redirects,
        headers=headers,
        trust_env=False,
        verify=tls or default_tls_context(),
        **more,
    )
