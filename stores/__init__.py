"""Persistence behind small Protocols: Redis for several processes, memory for one."""

from __future__ import annotations

from stores.base import (
    DIFY_FIELDS,
    DONE,
    ERROR,
    QUEUED,
    STREAMING,
    TERMINAL,
    ChunkWrite,
    ConversationStore,
    DedupeStore,
    Snapshot,
    Stores,
    StreamSession,
    StreamStore,
)
from stores.memory_store import MemoryStores
from stores.redis_store import RedisStores

__all__ = [
    "DIFY_FIELDS",
    "DONE",
    "ERROR",
    "QUEUED",
    "STREAMING",
    "TERMINAL",
    "ChunkWrite",
    "ConversationStore",
    "DedupeStore",
    "MemoryStores",
    "RedisStores",
    "Snapshot",
    "Stores",
    "StreamSession",
    "StreamStore",
    "open_stores",
]


def open_stores(
    redis_url: str | None,
    *,
    prefix: str = "laibao",
    sentinel_password: str | None = None,
    pool_size: int = 50,
    pool_timeout: float = 5.0,
) -> Stores:
    """Redis stores for ``redis_url`` (a pool of ``pool_size``), or in-process stores when it is None or empty."""
    if not redis_url:
        return MemoryStores()
    return RedisStores(redis_url, prefix=prefix, sentinel_password=sentinel_password, pool_size=pool_size,
                       pool_timeout=pool_timeout)
