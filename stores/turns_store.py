"""Ordering and admission of messages across processes: per-conversation turns, per-user in-flight limits.

Keys (see ``stores.keys``): a conversation's turn list holds its stream ids in arrival order (the
head is the one message Dify may answer now) and shares the hash slot of those sessions; a user's
in-flight sorted set holds the stream ids of their admitted messages, scored by admission time.

Both read the session hashes (see ``stores.redis_store``): a message whose relay is over can never
finish, so it neither holds a conversation's turn nor counts against its user's limit. A relay is over
when its session is missing (expired, never created), or ``done``/``error`` unless ``x:relay`` is
``on`` (WeCom's window closed, the relay still streams) with an ``x:beat`` (the relay's heartbeat) at
most the lease old. Callers therefore create a message's session before they ``join`` or ``acquire``
for it.

Every script declares every key it touches and touches one key. A turn check reads the head, then
its session's status, and drops a head found over with a script that pops it only if it is still the
head; an admission reads the statuses of the user's sessions (any slots), then runs a script on the
set alone. A session found over stays over (a relay whose heartbeat went stale is taken for dead), so
each step is safe on its own, on a cluster too.
Redis errors leave this module as ``StoreError``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from redis.typing import EncodableT

from stores.base import TERMINAL, StreamSession, StreamStore
from stores.connection import Client, register
from stores.errors import redis_errors, ttl_ms
from stores.keys import DEFAULT_PREFIX, Keys
from stores.memory_store import Clock, ExpiringMap
from stores.redis_store import lua

# Looks up a session: None when it is missing or expired.
StatusOf = Callable[[str], Awaitable[StreamSession | None]]

# What ``my_turn`` answers.
HEAD, WAITING, NOT_QUEUED = 1, 0, -1
RELAY_ON = "on"  # extra ``relay``: the stream was closed for WeCom's window, the relay still runs


class TurnQueue(Protocol):
    """Per-conversation turns: one conversation's messages reach Dify one at a time, in arrival order."""

    async def join(self, bot: str, scope: str, sid: str, ttl: float) -> int:
        """Append ``sid`` unless queued (one entry each), keep the queue ``ttl`` s; its 0-based position."""
        ...

    async def my_turn(self, bot: str, scope: str, sid: str, now: float | None = None) -> int:
        """HEAD, WAITING or NOT_QUEUED for ``sid``, once heads whose relay is over are dropped."""
        ...

    async def leave(self, bot: str, scope: str, sid: str) -> None:
        """Remove ``sid`` wherever it is in the queue."""
        ...

    async def head(self, bot: str, scope: str) -> str | None:
        """The sid at the head of the conversation's queue (the one Dify is answering), if any."""
        ...


class InFlight(Protocol):
    """Per-user admission: at most ``limit`` of one user's messages in flight at once."""

    async def acquire(self, bot: str, user: str, sid: str, limit: int, ttl: float, now: float) -> bool:
        """Admit ``sid`` (again, if already admitted) unless ``limit`` live messages hold slots."""
        ...

    async def release(self, bot: str, user: str, sid: str) -> None:
        """Free the slot of ``sid``, if it holds one."""
        ...


class Turns(Protocol):
    """The turn queues and in-flight limits one app uses."""

    @property
    def turns(self) -> TurnQueue:
        """The per-conversation turn queues."""
        ...

    @property
    def inflight(self) -> InFlight:
        """The per-user in-flight limits."""
        ...


# ---------------------------------------------------------------------------------------------------
# Lua scripts.

JOIN_LUA = """
-- KEYS[1] turns list
-- ARGV[1] stream id, ARGV[2] queue ttl in milliseconds
-- returns the 0-based position of ARGV[1], appending it first unless it is already queued;
-- either way the queue lives ARGV[2] ms from now
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local position = #items
for i = 1, #items do
  if items[i] == ARGV[1] then
    position = i - 1
    break
  end
end
if position == #items then redis.call('RPUSH', KEYS[1], ARGV[1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return position
"""

DROP_HEAD_LUA = """
-- KEYS[1] turns list
-- ARGV[1] a head the caller found over for good (missing, or done/error with no live relay)
-- returns 1 if ARGV[1] was still the head and was popped, else 0 (someone else moved the queue on)
if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then
  redis.call('LPOP', KEYS[1])
  return 1
end
return 0
"""

ACQUIRE_LUA = """
-- KEYS[1] in-flight sorted set
-- ARGV[1] stream id, ARGV[2] limit, ARGV[3] now, ARGV[4] ttl (seconds), ARGV[5] key ttl in milliseconds,
-- ARGV[6..] members the caller found over for good (missing, or done/error with no live relay)
-- returns 1 if ARGV[1] holds a slot (it already did, or a slot was free), else 0; first removes those
-- members and the ones admitted more than ttl before now; a member added meanwhile counts as live
local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 6, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local live, mine = 0, false
for i = 1, #members, 2 do
  local sid = members[i]
  if now - tonumber(members[i + 1]) > ttl then
    redis.call('ZREM', KEYS[1], sid)
  else
    live = live + 1
    if sid == ARGV[1] then mine = true end
  end
end
if mine then return 1 end
if live >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""


RELAY_FIELDS = ("status", "x:relay", "x:beat")  # what a running check reads of a session hash


def _fields_running(row: list[str | None], now: float, lease: float) -> bool:
    """``relay_running`` on the RELAY_FIELDS of a session hash (all None when it is missing)."""
    status, relay, beat = row
    if status is None:
        return False
    if status not in TERMINAL:
        return True
    return relay == RELAY_ON and not now - _beat(beat) > lease


def _beat(beat: str | None) -> float:
    """A heartbeat's unix seconds; 0 (long stale) when missing or unreadable."""
    try:
        return float(beat) if beat else 0.0
    except ValueError:
        return 0.0


async def _redis_running(client: Client, key: str, now: float, lease: float) -> bool:
    """Whether the session hash ``key`` belongs to a relay that can still finish."""
    row: list[str | None] = await client.hmget(key, RELAY_FIELDS)
    return _fields_running(row, now, lease)


class RedisTurnQueue:
    """Per-conversation turns as one Redis list each."""

    def __init__(self, client: Client, keys: Keys, lease: float) -> None:
        self._client = client
        self._keys = keys
        self._lease = lease
        self._join = register(client, lua(JOIN_LUA))
        self._drop_head = register(client, lua(DROP_HEAD_LUA))

    def key(self, bot: str, scope: str) -> str:
        """The list key of a conversation's queue."""
        return self._keys.turns(bot, scope)

    async def join(self, bot: str, scope: str, sid: str, ttl: float) -> int:
        """Append ``sid`` unless queued (one entry each), keep the queue ``ttl`` s; its 0-based position."""
        px = ttl_ms(ttl)
        with redis_errors("turns join"):
            return int(await self._join(keys=[self.key(bot, scope)], args=[sid, px]))

    async def my_turn(self, bot: str, scope: str, sid: str, now: float | None = None) -> int:
        """HEAD, WAITING or NOT_QUEUED for ``sid``, once heads whose relay is over are dropped."""
        key = self.key(bot, scope)
        at = time.time() if now is None else now
        with redis_errors("turns my_turn"):
            while True:
                head = await self._client.lindex(key, 0)
                if head is None:
                    return NOT_QUEUED
                if await _redis_running(self._client, self._keys.stream(head), at, self._lease):
                    if head == sid:
                        return HEAD
                    queued: list[str] = await self._client.lrange(key, 1, -1)
                    return WAITING if sid in queued else NOT_QUEUED
                # a message that can never finish would hold the turn forever: drop it if still the head
                await self._drop_head(keys=[key], args=[head])

    async def leave(self, bot: str, scope: str, sid: str) -> None:
        """Remove ``sid`` wherever it is in the queue."""
        with redis_errors("turns leave"):
            await self._client.lrem(self.key(bot, scope), 0, sid)

    async def head(self, bot: str, scope: str) -> str | None:
        """The sid at the head of the conversation's queue (the one Dify is answering), if any."""
        with redis_errors("turns head"):
            first = await self._client.lindex(self.key(bot, scope), 0)
        return None if first is None else str(first)


class RedisInFlight:
    """Per-user in-flight messages as one Redis sorted set each."""

    def __init__(self, client: Client, keys: Keys, lease: float) -> None:
        self._client = client
        self._keys = keys
        self._lease = lease
        self._acquire = register(client, lua(ACQUIRE_LUA))

    def key(self, bot: str, user: str) -> str:
        """The sorted-set key of a user's in-flight messages."""
        return self._keys.inflight(bot, user)

    async def acquire(self, bot: str, user: str, sid: str, limit: int, ttl: float, now: float) -> bool:
        """Admit ``sid`` (again, if already admitted) unless ``limit`` live messages hold slots."""
        px, key = ttl_ms(ttl), self.key(bot, user)
        with redis_errors("inflight acquire"):
            members: list[str] = await self._client.zrange(key, 0, -1)
            running = await self._running(members, now)
            dead = [member for member in members if member not in running]
            args: list[EncodableT] = [sid, limit, repr(float(now)), repr(float(ttl)), px, *dead]
            return bool(await self._acquire(keys=[key], args=args))

    async def _running(self, sids: list[str], now: float) -> set[str]:
        """Which of ``sids`` have a relay that can still finish: read apart from the set, since the
        sessions live in their scopes' slots (a cluster pipeline sends each node its share)."""
        if not sids:
            return set()
        async with self._client.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hmget(self._keys.stream(sid), RELAY_FIELDS)
            rows = await pipe.execute()
        return {sid for sid, row in zip(sids, rows, strict=True) if _fields_running(row, now, self._lease)}

    async def release(self, bot: str, user: str, sid: str) -> None:
        """Free the slot of ``sid``, if it holds one."""
        with redis_errors("inflight release"):
            await self._client.zrem(self.key(bot, user), sid)


class RedisTurns:
    """Turns and in-flight limits shared by every process through ``client`` (not closed here)."""

    def __init__(self, client: Client, keys: Keys | None = None, *, lease: float = 15.0) -> None:
        keys = keys or Keys(DEFAULT_PREFIX)
        self.turns = RedisTurnQueue(client, keys, lease)
        self.inflight = RedisInFlight(client, keys, lease)


# ---------------------------------------------------------------------------------------------------
# Memory. ``status_of`` may suspend, so every method re-reads its entry after awaiting it and only
# then changes anything; the final check-and-write runs without awaiting, hence atomically.


_KEYS = Keys()  # the memory maps are keyed by the Redis key names


def session_status(streams: StreamStore) -> StatusOf:
    """A ``status_of`` for MemoryTurns that reads sessions from ``streams``."""

    async def status_of(sid: str) -> StreamSession | None:
        return await streams.get(sid)

    return status_of


def relay_running(session: StreamSession | None, now: float, lease: float) -> bool:
    """Whether a session's relay can still finish: running, or past WeCom's window with a fresh heartbeat."""
    if session is None:
        return False
    return _fields_running([session.status, session.extra.get("relay"), session.extra.get("beat")], now, lease)


async def _running(status_of: StatusOf | None, sid: str, now: float, lease: float) -> bool:
    """Whether the relay of ``sid`` can still finish (always, when sessions are not looked up)."""
    if status_of is None:
        return True
    return relay_running(await status_of(sid), now, lease)


class MemoryTurnQueue:
    """Per-conversation turns in a bounded, expiring dict."""

    def __init__(self, status_of: StatusOf | None, max_entries: int, clock: Clock, lease: float) -> None:
        self._status_of = status_of
        self._clock = clock
        self._lease = lease
        self._queues: ExpiringMap[list[str]] = ExpiringMap(max_entries, clock)

    async def join(self, bot: str, scope: str, sid: str, ttl: float) -> int:
        """Append ``sid`` unless queued (one entry each), keep the queue ``ttl`` s; its 0-based position."""
        _check_ttl(ttl)
        key = _KEYS.turns(bot, scope)  # the Redis key names: the same pairs collide, no others
        queue = self._queues.get(key) or []
        if sid not in queue:
            queue.append(sid)
        self._queues.put(key, queue, ttl)
        return queue.index(sid)

    async def my_turn(self, bot: str, scope: str, sid: str, now: float | None = None) -> int:
        """HEAD, WAITING or NOT_QUEUED for ``sid``, once heads whose relay is over are dropped."""
        key = _KEYS.turns(bot, scope)
        at = self._clock() if now is None else now
        while True:
            queue = self._queues.get(key)
            if not queue:
                return NOT_QUEUED
            head = queue[0]
            if await _running(self._status_of, head, at, self._lease):
                queue = self._queues.get(key) or []  # re-read: from here on nothing awaits
                if queue and queue[0] == sid:
                    return HEAD
                return WAITING if sid in queue else NOT_QUEUED
            queue = self._queues.get(key)  # it may have changed while the status was looked up
            if queue and queue[0] == head:
                del queue[0]
                if not queue:
                    self._queues.pop(key)  # as Redis deletes an empty list

    async def leave(self, bot: str, scope: str, sid: str) -> None:
        """Remove ``sid`` wherever it is in the queue."""
        key = _KEYS.turns(bot, scope)
        queue = self._queues.get(key)
        if queue is None or sid not in queue:
            return
        queue.remove(sid)
        if not queue:
            self._queues.pop(key)

    async def head(self, bot: str, scope: str) -> str | None:
        """The sid at the head of the conversation's queue (the one Dify is answering), if any."""
        queue = self._queues.get(_KEYS.turns(bot, scope))
        return queue[0] if queue else None


class MemoryInFlight:
    """Per-user in-flight messages in a bounded, expiring dict of admission times."""

    def __init__(self, status_of: StatusOf | None, max_entries: int, clock: Clock, lease: float) -> None:
        self._status_of = status_of
        self._lease = lease
        self._admitted: ExpiringMap[dict[str, float]] = ExpiringMap(max_entries, clock)

    async def _dead(self, key: str, now: float) -> set[str]:
        """The admitted sids whose relay is over."""
        admitted = self._admitted.get(key) or {}
        return {sid for sid in list(admitted) if not await _running(self._status_of, sid, now, self._lease)}

    async def acquire(self, bot: str, user: str, sid: str, limit: int, ttl: float, now: float) -> bool:
        """Admit ``sid`` (again, if already admitted) unless ``limit`` live messages hold slots."""
        _check_ttl(ttl)
        key = _KEYS.inflight(bot, user)
        dead = await self._dead(key, now)
        admitted = self._admitted.get(key) or {}  # re-read: from here on nothing awaits
        for other, since in list(admitted.items()):
            if now - since > ttl or other in dead:
                del admitted[other]
        if sid in admitted:
            return True
        if len(admitted) >= limit:
            if not admitted:
                self._admitted.pop(key)  # as Redis deletes an empty sorted set
            return False
        admitted[sid] = float(now)
        self._admitted.put(key, admitted, ttl)
        return True

    async def release(self, bot: str, user: str, sid: str) -> None:
        """Free the slot of ``sid``, if it holds one."""
        key = _KEYS.inflight(bot, user)
        admitted = self._admitted.get(key)
        if admitted is not None and admitted.pop(sid, None) is not None and not admitted:
            self._admitted.pop(key)


class MemoryTurns:
    """Turns and in-flight limits for one process; ``status_of`` None treats every session as running."""

    def __init__(
        self,
        status_of: StatusOf | None = None,
        *,
        max_entries: int = 100_000,
        clock: Clock = time.time,
        lease: float = 15.0,
    ) -> None:
        self.turns = MemoryTurnQueue(status_of, max_entries, clock, lease)
        self.inflight = MemoryInFlight(status_of, max_entries, clock, lease)


def _check_ttl(ttl: float) -> None:
    # the same refusal as the Redis implementation, whose PEXPIRE needs a positive number
    if not ttl > 0:
        raise ValueError(f"ttl must be positive, not {ttl!r}")
