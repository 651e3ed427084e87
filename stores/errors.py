"""The errors of the state layer, at the bottom so that ``stores`` imports nothing from ``laibao``.

``laibao.errors`` re-exports both names: ``LaibaoError`` stays the root of every error laibao raises.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

from redis.exceptions import RedisClusterException, RedisError


class LaibaoError(Exception):
    """Root of every error laibao raises on purpose."""


class StoreError(LaibaoError):
    """Redis or MySQL is unavailable or misbehaving."""


@contextmanager
def redis_errors(operation: str) -> Iterator[None]:
    """Turn Redis (and socket) failures into StoreError; the message names the operation only."""
    try:
        yield
    except (RedisError, RedisClusterException, OSError) as exc:
        # Redis error texts name the server and the failure, never the values sent
        raise StoreError(f"redis {operation} failed: {type(exc).__name__}: {str(exc)[:200]}") from exc


def ttl_ms(ttl: float) -> int:
    """A positive TTL in whole milliseconds, as PX / PEXPIRE want it."""
    if not ttl > 0:
        raise ValueError(f"ttl must be positive, not {ttl!r}")
    return max(1, math.floor(ttl * 1000 + 0.5))
