"""WeCom's AI-bot protocol as data: message parsing and reply builders, the crypto, WeCom's limits, error codes,
and response_url. Every layer above uses it; it knows nothing of them."""
