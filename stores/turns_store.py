"""Ordering and admission of messages across processes: per-conversation turns, per-user in-flight limits.

Keys (``laibao`` is the prefix):

    laibao:turns:{bot}:{scope}     list   stream ids of one conversation in arrival order; the head
                                          is the one message Dify may answer now
    laibao:inflight:{bot}:{user}   zset   stream ids of one user's admitted messages, scored by
                                          admission time (unix seconds, as the caller's clock says)

Both read the session hashes ``laibao:stream:{sid}`` (see ``stores.redis_store``): a message whose
relay is over can never finish, so it neither holds a conversation's turn nor counts against its
user's limit. A relay is over when its session is missing (expired, never created), or ``done``/``error``
unless ``x:relay`` is ``on`` (WeCom's window closed, the relay still streams) with an ``x:beat`` (the
relay's heartbeat) newer than the lease. Callers therefore create a message's session before they
``join`` or ``acquire`` for it.

Every read-modify-write is one Lua script. Redis errors leave this module as ``StoreError``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.typing import EncodableT

from stores.base import TERMINAL, StreamSession, StreamStore
from stores.memory_store import Clock, ExpiringMap
from stores.redis_store import redis_errors, ttl_ms

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

    async def position(self, bot: str, scope: str, sid: str) -> int | None:
        """The 0-based position of ``sid`` as queued (dead heads included), or None if not queued."""
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

    async def count(self, bot: str, user: str, now: float, *, ttl: float) -> int:
        """How many admitted messages are live at ``now``: admitted at most ``ttl`` s ago, session running."""
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
# Lua scripts. The turn and in-flight scripts read session hashes whose names they learn only while
# running (queue heads, set members), so the stream key prefix travels in ARGV: fine on one Redis
# server, not on Redis Cluster, where every key must be declared in KEYS.

# Shared start of the scripts that look at sessions.
# Defines running(key, now, lease): true iff the session hash exists and its relay is not over: its
# status is neither done nor error, or WeCom's window closed it while the relay goes on with a
# heartbeat ('x:beat') at most lease seconds old.
_RUNNING_PRELUDE = """
local function running(key, now, lease)
  local h = redis.call('HMGET', key, 'status', 'x:relay', 'x:beat')
  if not h[1] then return false end
  if h[1] ~= 'done' and h[1] ~= 'error' then return true end
  return h[2] == 'on' and not (now - (tonumber(h[3]) or 0) > lease)
end
"""

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

MY_TURN_LUA = (
    """
-- KEYS[1] turns list
-- ARGV[1] stream id, ARGV[2] stream key prefix ('laibao:stream:'), ARGV[3] now, ARGV[4] lease
-- returns 1 if ARGV[1] is at the head, 0 if it waits behind another, -1 if it is not queued (the
-- list is missing or lacks it); first pops every head whose relay is over, since such a message
-- can never finish and would hold the turn forever
"""
    + _RUNNING_PRELUDE
    + """
local now, lease = tonumber(ARGV[3]), tonumber(ARGV[4])
while true do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head then return -1 end
  if running(ARGV[2] .. head, now, lease) then
    if head == ARGV[1] then return 1 end
    for _, sid in ipairs(redis.call('LRANGE', KEYS[1], 1, -1)) do
      if sid == ARGV[1] then return 0 end
    end
    return -1
  end
  redis.call('LPOP', KEYS[1])
end
"""
)

POSITION_LUA = """
-- KEYS[1] turns list
-- ARGV[1] stream id
-- returns the 0-based position of ARGV[1], or nil if it is not queued
-- (a loop rather than LPOS, which needs Redis 6.0.6)
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for i = 1, #items do
  if items[i] == ARGV[1] then return i - 1 end
end
return false
"""

ACQUIRE_LUA = (
    """
-- KEYS[1] in-flight sorted set
-- ARGV[1] stream id, ARGV[2] limit, ARGV[3] now, ARGV[4] ttl (seconds),
-- ARGV[5] stream key prefix ('laibao:stream:'), ARGV[6] key ttl in milliseconds, ARGV[7] lease
-- returns 1 if ARGV[1] holds a slot (it already did, or a slot was free), else 0; first removes the
-- members admitted more than ttl before now and those whose relay is over
"""
    + _RUNNING_PRELUDE
    + """
local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local live, mine = 0, false
for i = 1, #members, 2 do
  local sid = members[i]
  if now - tonumber(members[i + 1]) > ttl or not running(ARGV[5] .. sid, now, tonumber(ARGV[7])) then
    redis.call('ZREM', KEYS[1], sid)
  else
    live = live + 1
    if sid == ARGV[1] then mine = true end
  end
end
if mine then return 1 end
if live >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
"""
)

COUNT_LUA = (
    """
-- KEYS[1] in-flight sorted set
-- ARGV[1] now, ARGV[2] ttl (seconds), ARGV[3] stream key prefix ('laibao:stream:'), ARGV[4] lease
-- returns how many members were admitted at most ttl before now and whose relay is not over;
-- changes nothing (the next acquire removes the rest)
"""
    + _RUNNING_PRELUDE
    + """
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local live = 0
for i = 1, #members, 2 do
  if not (now - tonumber(members[i + 1]) > ttl) and running(ARGV[3] .. members[i], now, tonumber(ARGV[4])) then
    live = live + 1
  end
end
return live
"""
)


class RedisTurnQueue:
    """Per-conversation turns as one Redis list each."""

    def __init__(self, client: aioredis.Redis, prefix: str, lease: float) -> None:
        self._client = client
        self._prefix = prefix
        self._lease = lease
        self._join = client.register_script(JOIN_LUA)
        self._my_turn = client.register_script(MY_TURN_LUA)
        self._position = client.register_script(POSITION_LUA)

    def key(self, bot: str, scope: str) -> str:
        """The list key of a conversation's queue."""
        return f"{self._prefix}:turns:{bot}:{scope}"

    async def join(self, bot: str, scope: str, sid: str, ttl: float) -> int:
        """Append ``sid`` unless queued (one entry each), keep the queue ``ttl`` s; its 0-based position."""
        px = ttl_ms(ttl)
        with redis_errors("turns join"):
            return int(await self._join(keys=[self.key(bot, scope)], args=[sid, px]))

    async def my_turn(self, bot: str, scope: str, sid: str, now: float | None = None) -> int:
        """HEAD, WAITING or NOT_QUEUED for ``sid``, once heads whose relay is over are dropped."""
        at = time.time() if now is None else now
        args: list[EncodableT] = [sid, f"{self._prefix}:stream:", repr(float(at)), repr(float(self._lease))]
        with redis_errors("turns my_turn"):
            return int(await self._my_turn(keys=[self.key(bot, scope)], args=args))

    async def leave(self, bot: str, scope: str, sid: str) -> None:
        """Remove ``sid`` wherever it is in the queue."""
        with redis_errors("turns leave"):
            await self._client.lrem(self.key(bot, scope), 0, sid)

    async def position(self, bot: str, scope: str, sid: str) -> int | None:
        """The 0-based position of ``sid`` as queued (dead heads included), or None if not queued."""
        with redis_errors("turns position"):
            found = await self._position(keys=[self.key(bot, scope)], args=[sid])
        return None if found is None else int(found)

    async def head(self, bot: str, scope: str) -> str | None:
        """The sid at the head of the conversation's queue (the one Dify is answering), if any."""
        with redis_errors("turns head"):
            first = await self._client.lindex(self.key(bot, scope), 0)
        return None if first is None else str(first)


class RedisInFlight:
    """Per-user in-flight messages as one Redis sorted set each."""

    def __init__(self, client: aioredis.Redis, prefix: str, lease: float) -> None:
        self._client = client
        self._prefix = prefix
        self._lease = lease
        self._acquire = client.register_script(ACQUIRE_LUA)
        self._count = client.register_script(COUNT_LUA)

    def key(self, bot: str, user: str) -> str:
        """The sorted-set key of a user's in-flight messages."""
        return f"{self._prefix}:inflight:{bot}:{user}"

    async def acquire(self, bot: str, user: str, sid: str, limit: int, ttl: float, now: float) -> bool:
        """Admit ``sid`` (again, if already admitted) unless ``limit`` live messages hold slots."""
        px = ttl_ms(ttl)
        args: list[EncodableT] = [sid, limit, repr(float(now)), repr(float(ttl)), f"{self._prefix}:stream:", px,
                                  repr(float(self._lease))]
        with redis_errors("inflight acquire"):
            return bool(await self._acquire(keys=[self.key(bot, user)], args=args))

    async def release(self, bot: str, user: str, sid: str) -> None:
        """Free the slot of ``sid``, if it holds one."""
        with redis_errors("inflight release"):
            await self._client.zrem(self.key(bot, user), sid)

    async def count(self, bot: str, user: str, now: float, *, ttl: float) -> int:
        """How many admitted messages are live at ``now``: admitted at most ``ttl`` s ago, session running."""
        args = [repr(float(now)), repr(float(ttl)), f"{self._prefix}:stream:", repr(float(self._lease))]
        with redis_errors("inflight count"):
            return int(await self._count(keys=[self.key(bot, user)], args=args))


class RedisTurns:
    """Turns and in-flight limits shared by every process through ``client`` (not closed here)."""

    def __init__(self, client: aioredis.Redis, prefix: str = "laibao", *, lease: float = 15.0) -> None:
        self.turns = RedisTurnQueue(client, prefix, lease)
        self.inflight = RedisInFlight(client, prefix, lease)


# ---------------------------------------------------------------------------------------------------
# Memory. ``status_of`` may suspend, so every method re-reads its entry after awaiting it and only
# then changes anything; the final check-and-write runs without awaiting, hence atomically.


def session_status(streams: StreamStore) -> StatusOf:
    """A ``status_of`` for MemoryTurns that reads sessions from ``streams``."""

    async def status_of(sid: str) -> StreamSession | None:
        return await streams.get(sid)

    return status_of


def relay_running(session: StreamSession | None, now: float, lease: float) -> bool:
    """Whether a session's relay can still finish: running, or past WeCom's window with a fresh heartbeat."""
    if session is None:
        return False
    if session.status not in TERMINAL:
        return True
    beat = session.extra.get("beat", "")
    try:
        last = float(beat) if beat else 0.0
    except ValueError:
        last = 0.0
    return session.extra.get("relay") == RELAY_ON and not now - last > lease


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
        key = f"{bot}:{scope}"  # joined as in the Redis key, so the same pairs collide
        queue = self._queues.get(key) or []
        if sid not in queue:
            queue.append(sid)
        self._queues.put(key, queue, ttl)
        return queue.index(sid)

    async def my_turn(self, bot: str, scope: str, sid: str, now: float | None = None) -> int:
        """HEAD, WAITING or NOT_QUEUED for ``sid``, once heads whose relay is over are dropped."""
        key = f"{bot}:{scope}"
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
        key = f"{bot}:{scope}"
        queue = self._queues.get(key)
        if queue is None or sid not in queue:
            return
        queue.remove(sid)
        if not queue:
            self._queues.pop(key)

    async def position(self, bot: str, scope: str, sid: str) -> int | None:
        """The 0-based position of ``sid`` as queued (dead heads included), or None if not queued."""
        queue = self._queues.get(f"{bot}:{scope}")
        return queue.index(sid) if queue is not None and sid in queue else None

    async def head(self, bot: str, scope: str) -> str | None:
        """The sid at the head of the conversation's queue (the one Dify is answering), if any."""
        queue = self._queues.get(f"{bot}:{scope}")
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
        key = f"{bot}:{user}"
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
        key = f"{bot}:{user}"
        admitted = self._admitted.get(key)
        if admitted is not None and admitted.pop(sid, None) is not None and not admitted:
            self._admitted.pop(key)

    async def count(self, bot: str, user: str, now: float, *, ttl: float) -> int:
        """How many admitted messages are live at ``now``: admitted at most ``ttl`` s ago, session running."""
        key = f"{bot}:{user}"
        dead = await self._dead(key, now)
        admitted = self._admitted.get(key) or {}
        return sum(1 for sid, since in admitted.items() if not now - since > ttl and sid not in dead)


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
