"""The shared token cache: each user's current auth token, a short sign-in lock, and invalidations.

Keys (the layout existing deployments of this design already use, so they can share one Redis):

    authorization:wechatid:{userid}   string  the user's current token            TTL = token lifetime
    authorization:token:{token}       string  user info JSON                      TTL = token lifetime
    {p}:auth:lock:{userid}            string  id of the process signing the user in (short TTL)

The two ``authorization:*`` names carry no prefix and no hash tag, so on a cluster they land in
different slots: every step touches one of them only (the info is written before the pointer and
dropped before it), and each step is safe alone. Invalidations travel on the pub/sub channel
``{p}:auth:invalidate`` (the message is the userid; classic pub/sub reaches every cluster node),
so every process drops its local copy of a token found invalid. The Redis implementation keeps its
own client; Redis failures leave it as ``StoreError``. The memory implementation is for one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio.lock import Lock
from redis.exceptions import LockError, RedisError

from stores.connection import Client, close, connect, register
from stores.errors import redis_errors, ttl_ms
from stores.keys import DEFAULT_PREFIX, Keys
from stores.memory_store import ExpiringMap

__all__ = [
    "EVERY_USER",
    "INVALIDATE_CHANNEL",
    "MemoryTokenCache",
    "RedisTokenCache",
    "TokenCache",
    "open_token_cache",
    "token_key",
    "user_key",
]

log = logging.getLogger("laibao.tokens")

INVALIDATE_CHANNEL = Keys().invalidate_channel
# What the listener hands its callback after it had to resubscribe: invalidations published while it
# was disconnected are lost, so every local entry must go. No WeCom userid contains "*".
EVERY_USER = "*"

Invalidated = Callable[[str], None]


def user_key(userid: str) -> str:
    """The key holding the user's current token."""
    return f"authorization:wechatid:{userid}"


def token_key(token: str) -> str:
    """The key holding the user info JSON of a token."""
    return f"authorization:token:{token}"


def lock_key(userid: str) -> str:
    """The key of the user's sign-in lock."""
    return Keys().auth_lock(userid)


class TokenCache(Protocol):
    """Auth tokens shared by every process, with a cross-process sign-in lock and invalidations."""

    async def get(self, userid: str) -> tuple[str, dict[str, Any]] | None:
        """The user's token and its info, or None unless both keys exist."""
        ...

    async def put(self, userid: str, token: str, info: dict[str, Any], ttl: float) -> None:
        """Make ``token`` the user's current token, with ``info``, both for ``ttl`` seconds."""
        ...

    async def drop(self, userid: str, token: str = "") -> None:
        """Forget ``token`` (the current one when empty); a newer token of the user is kept."""
        ...

    async def acquire_lock(self, userid: str, ttl: float) -> str | None:
        """Take the user's sign-in lock for ``ttl`` seconds; its id, or None if another holds it."""
        ...

    async def release_lock(self, userid: str, lock_id: str) -> None:
        """Release the lock if ``lock_id`` still holds it."""
        ...

    async def publish_invalidation(self, userid: str) -> None:
        """Tell every process to drop its local copy of the user's token."""
        ...

    async def listen_invalidations(self, callback: Invalidated) -> None:
        """Call ``callback(userid)`` for every invalidation (``EVERY_USER`` after a reconnection)."""
        ...

    async def ping(self) -> None:
        """Raise StoreError if the cache cannot be reached."""
        ...

    async def close(self) -> None:
        """Stop listening and release connections."""
        ...


def _dump_info(info: dict[str, Any]) -> str:
    return json.dumps(info, ensure_ascii=False, separators=(",", ":"))


def _load_info(raw: str) -> dict[str, Any]:
    """The info JSON as a dict; another writer's value that is not a JSON object reads as {}."""
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _check_ttl(ttl: float) -> None:
    if not ttl > 0:
        raise ValueError(f"ttl must be positive, not {ttl!r}")


# ------------------------------------------------------------------------------------------ memory

class MemoryTokenCache:
    """Tokens in this process's memory: one process only, so an invalidation calls back directly."""

    def __init__(self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._tokens: ExpiringMap[str] = ExpiringMap(max_entries, clock)  # the same two keys as Redis
        self._locks: ExpiringMap[str] = ExpiringMap(max_entries, clock)
        self._callbacks: list[Invalidated] = []

    async def get(self, userid: str) -> tuple[str, dict[str, Any]] | None:
        """The user's token and its info, or None unless both keys exist."""
        token = self._tokens.get(user_key(userid))
        if token is None:
            return None
        raw = self._tokens.get(token_key(token))
        return None if raw is None else (token, _load_info(raw))

    async def put(self, userid: str, token: str, info: dict[str, Any], ttl: float) -> None:
        """Make ``token`` the user's current token, with ``info``, both for ``ttl`` seconds."""
        _check_ttl(ttl)
        self._tokens.put(token_key(token), _dump_info(info), ttl)
        self._tokens.put(user_key(userid), token, ttl)

    async def drop(self, userid: str, token: str = "") -> None:
        """Forget ``token`` (the current one when empty); a newer token of the user is kept."""
        current = self._tokens.get(user_key(userid))
        token = token or current or ""
        if token and current == token:
            self._tokens.pop(user_key(userid))
        if token:
            self._tokens.pop(token_key(token))

    async def acquire_lock(self, userid: str, ttl: float) -> str | None:
        """Take the user's sign-in lock for ``ttl`` seconds; its id, or None if another holds it."""
        _check_ttl(ttl)
        if self._locks.get(lock_key(userid)) is not None:
            return None
        lock_id = uuid.uuid4().hex
        self._locks.put(lock_key(userid), lock_id, ttl)
        return lock_id

    async def release_lock(self, userid: str, lock_id: str) -> None:
        """Release the lock if ``lock_id`` still holds it."""
        if self._locks.get(lock_key(userid)) == lock_id:
            self._locks.pop(lock_key(userid))

    async def publish_invalidation(self, userid: str) -> None:
        """Call every listener at once (this process is the only one)."""
        for callback in list(self._callbacks):
            callback(userid)

    async def listen_invalidations(self, callback: Invalidated) -> None:
        """Call ``callback(userid)`` for every invalidation published here."""
        self._callbacks.append(callback)

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Forget the listeners."""
        self._callbacks.clear()


# ------------------------------------------------------------------------------------------- Redis

DROP_POINTER_LUA = """
-- KEYS[1] authorization:wechatid:{userid}
-- ARGV[1] token
-- Deletes the user's pointer only while it still names this token, so that dropping an old token
-- never removes a fresher one another process has just stored.
-- returns 1 if the user's pointer was removed, else 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

class RedisTokenCache:
    """Tokens in Redis for every process, on this cache's own client."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        sentinel_password: str | None = None,
        connect_timeout: float = 2.0,
        timeout: float = 5.0,
        reconnect_delays: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        # Its own small client (the listener holds a connection for good), from the one factory.
        self.client: Client = connect(url, sentinel_password=sentinel_password, pool_size=10,
                                      connect_timeout=connect_timeout, timeout=timeout)
        self._keys = Keys(prefix)
        self._channel = self._keys.invalidate_channel
        self._drop = register(self.client, DROP_POINTER_LUA)
        self._connect_timeout = connect_timeout
        self._reconnect_delays = reconnect_delays
        self._listener: asyncio.Task[None] | None = None

    async def get(self, userid: str) -> tuple[str, dict[str, Any]] | None:
        """The user's token and its info, or None unless both keys exist."""
        # Two reads: the second key's name depends on the first's value, which a cluster-safe script
        # could not compute. This runs only when the process cache misses.
        with redis_errors("get token"):
            token = _text(await self.client.get(user_key(userid)))
            if token is None:
                return None
            raw = _text(await self.client.get(token_key(token)))
        return None if raw is None else (token, _load_info(raw))

    async def put(self, userid: str, token: str, info: dict[str, Any], ttl: float) -> None:
        """Make ``token`` the user's current token, with ``info``, both for ``ttl`` seconds."""
        px = ttl_ms(ttl)
        with redis_errors("put token"):
            # two slots on a cluster: the info first, so a reader that finds the pointer finds the info
            await self.client.set(token_key(token), _dump_info(info), px=px)
            await self.client.set(user_key(userid), token, px=px)

    async def drop(self, userid: str, token: str = "") -> None:
        """Forget ``token`` (the current one when empty); a newer token of the user is kept."""
        with redis_errors("drop token"):
            if not token:
                token = _text(await self.client.get(user_key(userid))) or ""
                if not token:
                    return
            # the info first: a pointer left alone leads to no info, which reads as no token
            await self.client.delete(token_key(token))
            await self._drop(keys=[user_key(userid)], args=[token])

    async def acquire_lock(self, userid: str, ttl: float) -> str | None:
        """Take the user's sign-in lock for ``ttl`` seconds; its id, or None if another holds it."""
        ttl_ms(ttl)  # the same refusal of a non-positive TTL as everywhere
        lock_id = uuid.uuid4().hex
        with redis_errors("acquire lock"):
            taken = await self._lock(userid, ttl).acquire(blocking=False, token=lock_id)
        return lock_id if taken else None

    async def release_lock(self, userid: str, lock_id: str) -> None:
        """Release the lock if ``lock_id`` still holds it."""
        with redis_errors("release lock"), contextlib.suppress(LockError):
            # LockNotOwnedError: it expired, or another holder has it now; either way it is not ours
            await self._lock(userid, None).do_release(lock_id.encode())

    def _lock(self, userid: str, ttl: float | None) -> Lock:
        """redis-py's lock on the user's sign-in key (one key: fine on a cluster)."""
        return Lock(self.client, self._keys.auth_lock(userid), timeout=ttl)

    async def publish_invalidation(self, userid: str) -> None:
        """Tell every process (this one included) to drop its local copy of the user's token."""
        with redis_errors("publish invalidation"):
            await self.client.publish(self._channel, userid)

    async def listen_invalidations(self, callback: Invalidated) -> None:
        """Start the listener task; returns once subscribed, or after the connect timeout if Redis is down.

        The task resubscribes after an outage (backing off) and then calls ``callback(EVERY_USER)``,
        since invalidations published meanwhile were lost.
        """
        if self._listener is not None:
            raise RuntimeError("already listening for invalidations")
        subscribed = asyncio.Event()
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(callback, subscribed), name="laibao-auth-invalidations"
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._connect_timeout + 1.0):
                await subscribed.wait()
        if not subscribed.is_set():
            log.warning("not subscribed to %s yet (Redis unreachable); retrying in the background",
                        INVALIDATE_CHANNEL)

    async def _listen(self, callback: Invalidated, subscribed: asyncio.Event) -> None:
        delay, cap = self._reconnect_delays
        connected_before = False
        while True:
            pubsub = self.client.pubsub()
            try:
                # a cluster client picks the node to subscribe on from its slot map: learn it first
                await self.client.ping()
                await pubsub.subscribe(self._channel)
                while True:
                    # a bounded wait, so the periodic health check also runs on a quiet channel
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        if connected_before:
                            log.info("resubscribed to %s; dropping every local token", INVALIDATE_CHANNEL)
                            _call(callback, EVERY_USER)
                        connected_before = True
                        delay = self._reconnect_delays[0]
                        subscribed.set()
                    elif message["type"] == "message":
                        _call(callback, str(message["data"]))
            except (RedisError, OSError) as exc:
                log.warning("invalidation listener lost Redis (%s); reconnecting in %.1f s",
                            type(exc).__name__, delay)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(cap, delay * 2)

    async def ping(self) -> None:
        """Raise StoreError if Redis cannot be reached."""
        with redis_errors("ping"):
            await self.client.ping()

    async def close(self) -> None:
        """Stop the listener task and close the client."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        await close(self.client)


def _text(value: bytes | str | None) -> str | None:
    """A reply of the client (which decodes responses) as the str it is."""
    return value.decode() if isinstance(value, bytes) else value


def _call(callback: Invalidated, userid: str) -> None:
    """Run the callback; a failing one must not stop the listener."""
    try:
        callback(userid)
    except Exception:
        log.exception("invalidation callback failed for %s", userid)


class TokenSettings(Protocol):
    """What ``open_token_cache`` reads from the configuration (``laibao.config.Config`` has it)."""

    @property
    def redis_url(self) -> str:
        """LAIBAO_REDIS_URL, or "" for one process."""
        ...

    @property
    def redis_prefix(self) -> str:
        """LAIBAO_REDIS_PREFIX."""
        ...

    @property
    def redis_sentinel_password(self) -> str:
        """LAIBAO_REDIS_SENTINEL_PASSWORD, or ""."""
        ...


def open_token_cache(config: TokenSettings) -> TokenCache:
    """Redis when ``redis_url`` is set, else in-process."""
    if config.redis_url:
        return RedisTokenCache(config.redis_url, prefix=config.redis_prefix,
                               sentinel_password=config.redis_sentinel_password or None)
    return MemoryTokenCache()
