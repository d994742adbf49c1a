"""Settings from environment variables: the parsers and the table both processes build on.

Each process (gateway, workers) declares its variables as ``name -> (field, default, parser,
meaning)``; ``parse_env`` turns them into values or a ConfigError naming the variable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlparse

from schemas.redis_client import SENTINEL_SCHEME, sentinel_url

Variables = dict[str, tuple[str, str, Callable[[str], Any], str]]


class ConfigError(ValueError):
    """A setting with a value that cannot be used."""


def parse_env(variables: Variables, env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, (field, default, parse, meaning) in variables.items():
        raw = env.get(name, default)
        try:
            values[field] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}={raw!r}: {exc} ({meaning})") from None
    return values


def table(variables: Variables) -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{name}` | `{default}` | {meaning} |"
             for name, (_, default, _, meaning) in variables.items()]
    return "\n".join(rows)


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be an integer between {low} and {high or 'any'}")
        return value

    return parse


def float_min(low: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw)
        if value < low:
            raise ValueError(f"must be a number >= {low}")
        return value

    return parse


def boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def one_of(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return raw

    return parse


def redis_url(raw: str) -> str:
    scheme = urlparse(raw).scheme
    if scheme == SENTINEL_SCHEME:
        sentinel_url(raw)  # raises ValueError naming what is wrong
    elif scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss://, unix:// or redis+sentinel:// URL")
    return raw


def bootstrap_servers(raw: str) -> str:
    hosts = [h.strip() for h in raw.split(",") if h.strip()]
    if not hosts or any(":" not in h for h in hosts):
        raise ValueError("must be a comma-separated list of host:port")
    return ",".join(hosts)
