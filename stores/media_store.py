"""Media a user sent without text, held for a few minutes to go with their next text message.

One Redis list per scope (``Keys.media``): JSON items in the order received; each add re-arms the TTL.

``take`` returns and clears the list in one atomic step, so of two messages racing on different
processes exactly one gets the held media. The list keeps at most ``max_items`` (the newest): a user
who sends a hundred pictures cannot grow it without bound.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, Protocol

from stores.connection import Client
from stores.errors import redis_errors, ttl_ms
from stores.keys import Keys
from stores.memory_store import Clock, ExpiringMap

DEFAULT_MAX_ITEMS = 20


class MediaHold(Protocol):
    """Per-scope lists of media items (JSON objects) waiting for the user's next text."""

    async def add(self, bot: str, scope: str, item: Mapping[str, Any], ttl: float) -> int:
        """Append ``item`` and keep the scope's list ``ttl`` seconds more; return how many are held."""
        ...

    async def take(self, bot: str, scope: str) -> list[dict[str, Any]]:
        """Return the held items in the order they were added, and clear them (atomically)."""
        ...


def _encode(item: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(item), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError("a held media item must be a JSON object") from exc




class RedisMediaHold:
    """Held media as one Redis list per scope."""

    def __init__(self, client: Client, keys: Keys | None = None, max_items: int = DEFAULT_MAX_ITEMS) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, not {max_items}")
        self._client = client
        self._keys = keys or Keys()
        self._max_items = max_items

    def key(self, bot: str, scope: str) -> str:
        """The list key of a scope."""
        return self._keys.media(bot, scope)

    async def add(self, bot: str, scope: str, item: Mapping[str, Any], ttl: float) -> int:
        """Append ``item`` and keep the scope's list ``ttl`` seconds more; return how many are held."""
        value, px, key = _encode(item), ttl_ms(ttl), self.key(bot, scope)
        with redis_errors("media add"):
            # MULTI: the push, the trim to the newest max_items and the expiry happen as one step
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.rpush(key, value)
                pipe.ltrim(key, -self._max_items, -1)
                pipe.pexpire(key, px)
                pipe.llen(key)
                *_, held = await pipe.execute()
        return int(held)

    async def take(self, bot: str, scope: str) -> list[dict[str, Any]]:
        """Return the held items in the order they were added, and clear them (atomically)."""
        key = self.key(bot, scope)
        with redis_errors("media take"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.lrange(key, 0, -1)
                pipe.delete(key)
                raw, _ = await pipe.execute()
        items: list[dict[str, Any]] = []
        for value in raw:
            try:
                item = json.loads(value)
            except ValueError:
                continue  # not written by add(): nothing a caller could use
            if isinstance(item, dict):
                items.append(item)
        return items


_KEYS = Keys()  # the memory map is keyed by the Redis key names


class MemoryMediaHold:
    """Held media for a single process (no method awaits, so each is atomic on the event loop)."""

    def __init__(
        self, max_entries: int = 10_000, max_items: int = DEFAULT_MAX_ITEMS, clock: Clock = time.time
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, not {max_items}")
        self._lists: ExpiringMap[list[str]] = ExpiringMap(max_entries, clock)
        self._max_items = max_items

    async def add(self, bot: str, scope: str, item: Mapping[str, Any], ttl: float) -> int:
        """Append ``item`` and keep the scope's list ``ttl`` seconds more; return how many are held."""
        value = _encode(item)
        ttl_ms(ttl)  # the same refusal of a non-positive TTL as Redis
        key = _KEYS.media(bot, scope)
        held = [*(self._lists.get(key) or []), value][-self._max_items :]
        self._lists.put(key, held, ttl)
        return len(held)

    async def take(self, bot: str, scope: str) -> list[dict[str, Any]]:
        """Return the held items in the order they were added, and clear them (atomically)."""
        key = _KEYS.media(bot, scope)
        held = self._lists.get(key) or []
        self._lists.pop(key)
        # Stored as JSON text, like Redis: a caller mutating an item it added or took changes nothing held.
        return [json.loads(value) for value in held]
