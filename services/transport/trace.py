"""Trace context on every backend call (W3C Trace Context): one trace per user message, named by the message's
stream (the same on a re-attach, a takeover, a retry), a span of its own per call. Dify links the id it finds in
`X-Trace-Id` (or in `traceparent`) to the run it starts; a proxy or model server that speaks OpenTelemetry joins the
trace through `traceparent`."""

from __future__ import annotations

import hashlib
import secrets


def trace_id_of(stream_id: str) -> str:
    """The trace id of a message (32 lowercase hex digits, never all zeros), from its stream id."""
    digest = hashlib.sha256(f"trace:{stream_id}".encode()).hexdigest()[:32]
    return digest if digest.strip("0") else "1" + digest[1:]


def trace_headers(trace_id: str) -> dict[str, str]:
    """The headers of one call in the trace: `traceparent` (version 00, a fresh span id, sampled) and `X-Trace-Id`."""
    return {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01", "X-Trace-Id": trace_id}
