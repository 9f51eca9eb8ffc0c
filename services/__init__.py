"""The gateway's services, in layers along a message's path (each imports only the layers below it; the
import-linter contract in pyproject.toml holds them): gateway -> longconn -> callback -> chat -> streams ->
media | texts -> dify | auth -> wecom -> the shared pieces (keys, Redis, metrics, loops, lua)."""
