"""A relay's life past WeCom's window, and the response_url delivery any process can finish.

WeCom polls a stream for 6 minutes; a relay may go on for longer. Past the window the session is
``done`` for WeCom (its final content was shown), but the relay is not over: these session extras
tell the two apart, and keep what is left to deliver where every process can reach it.

    x:relay    "on"        the stream was closed for the window; the relay still streams from Dify
               "finished"  the relay is over; ``x:outbox`` holds what the response_url must carry
               "delivered" / "failed"   the response_url delivery happened or was given up
               "over"      the relay ended with nothing to deliver
    x:beat     the relay's heartbeat once the stream is closed (unix seconds)
    x:outbox   the text to deliver (at most one response_url message)
    x:claim    "{node} {unix seconds}": who delivers it, since when

    {p}:undelivered   zset   stream ids whose relay went past the window or left an outbox, scored
                             by when they were added (``Keys.undelivered``)

A claim goes stale after the lease, so a process that died while delivering is replaced; a relay
``on`` whose heartbeat went stale died mid-answer: its outbox becomes the caller's interruption note.
Every read-modify-write of a session is one Lua script on its hash; the listing is written apart (one
slot per script, for Redis Cluster). Redis errors leave this module as ``StoreError``.
"""

from __future__ import annotations

from typing import Protocol

from stores.base import StreamStore
from stores.connection import Client, register
from stores.errors import redis_errors
from stores.keys import DEFAULT_PREFIX, Keys

RELAY_ON, RELAY_FINISHED, RELAY_DELIVERED, RELAY_FAILED, RELAY_OVER = "on", "finished", "delivered", "failed", "over"
DELIVERY_VALIDITY = 3600.0  # a response_url can be used for one hour after the message


class RelayState(Protocol):
    """Relays past WeCom's window and their pending response_url deliveries."""

    async def track(self, sid: str, now: float) -> None:
        """List ``sid`` among the sessions a sweep looks at."""
        ...

    async def beat(self, sid: str, owner: str, now: float) -> bool:
        """Record that the relay of a closed stream is alive; False if missing, not owned or not ``on``."""
        ...

    async def finished(self, sid: str, outbox: str, now: float) -> bool:
        """The relay is over and ``outbox`` must be delivered; False if the session is missing."""
        ...

    async def end(self, sid: str) -> None:
        """The relay is over with nothing to deliver (a no-op unless it is ``on``)."""
        ...

    async def claim(self, sid: str, node: str, now: float, lease: float, interrupted: str) -> str | None:
        """The text ``node`` must now deliver, or None (nothing to deliver, or another process claimed it)."""
        ...

    async def delivered(self, sid: str, ok: bool) -> None:
        """Record the delivery's end, drop the outbox and the listing."""
        ...

    async def pending(self, now: float, limit: int = 1000) -> list[str]:
        """Listed stream ids, oldest first; entries older than a response_url's validity are dropped."""
        ...


# Every script declares its keys and touches one hash slot: a session hash, or the listing alone. The
# listing is therefore updated in a call of its own, ordered so that each step is safe by itself: a
# session is listed before its outbox is written, and unlisted only after its delivery is recorded;
# a sweep that finds a listed session with nothing to deliver just unlists it.

TRACK_LUA = """
-- KEYS[1] undelivered zset; ARGV[1] stream id, ARGV[2] now
redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], 7200000)
return 1
"""

BEAT_LUA = """
-- KEYS[1] stream key; ARGV[1] owner, ARGV[2] now
-- returns 1 if the relay heartbeat was recorded, 0 if missing / not owned / not 'on'
local h = redis.call('HMGET', KEYS[1], 'owner', 'x:relay', 'ttl')
if ARGV[1] == '' or h[1] ~= ARGV[1] or h[2] ~= 'on' then return 0 end
redis.call('HSET', KEYS[1], 'x:beat', ARGV[2])
local ttl = tonumber(h[3])
if ttl and ttl > 0 then redis.call('PEXPIRE', KEYS[1], math.max(1, math.floor(ttl * 1000 + 0.5))) end
return 1
"""

FINISHED_LUA = """
-- KEYS[1] stream key; ARGV[1] outbox
-- returns 1 if recorded, 0 if the session is missing
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'x:relay', 'finished', 'x:outbox', ARGV[1])
return 1
"""

END_LUA = """
-- KEYS[1] stream key
if redis.call('HGET', KEYS[1], 'x:relay') == 'on' then redis.call('HSET', KEYS[1], 'x:relay', 'over') end
return 1
"""

CLAIM_LUA = """
-- KEYS[1] stream key
-- ARGV[1] node, ARGV[2] now, ARGV[3] lease, ARGV[4] interruption note
-- returns {1, text}: ARGV[1] must deliver text now (a finished outbox whose claim is free or stale,
-- or, for a relay 'on' whose heartbeat is stale: it died mid-answer, the interruption note);
-- {0}: not now (the relay still beats, or another claim is fresh); {-1}: nothing to deliver ever
-- (the session is gone or settled: the caller unlists it)
local h = redis.call('HMGET', KEYS[1], 'x:relay', 'x:outbox', 'x:claim', 'x:beat')
local now, lease = tonumber(ARGV[2]), tonumber(ARGV[3])
if not h[1] or (h[1] ~= 'on' and h[1] ~= 'finished') then return {-1} end
if h[1] == 'on' then
  if not (now - (tonumber(h[4]) or 0) > lease) then return {0} end
  h[2] = ARGV[4]
  redis.call('HSET', KEYS[1], 'x:relay', 'finished', 'x:outbox', h[2])
elseif h[3] then
  local since = tonumber(string.match(h[3], ' (%S+)$') or '0') or 0
  if not (now - since > lease) then return {0} end
end
redis.call('HSET', KEYS[1], 'x:claim', ARGV[1] .. ' ' .. ARGV[2])
return {1, h[2] or ''}
"""

DELIVERED_LUA = """
-- KEYS[1] stream key; ARGV[1] final state
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'x:relay', ARGV[1])
  redis.call('HDEL', KEYS[1], 'x:outbox', 'x:claim')
end
return 1
"""


class RedisRelayState:
    """Relay state in the session hashes, the listing in one sorted set (its own slot)."""

    def __init__(self, client: Client, keys: Keys | None = None) -> None:
        self._client = client
        self._keys = keys or Keys(DEFAULT_PREFIX)
        self._listing = self._keys.undelivered
        self._track = register(client, TRACK_LUA)
        self._beat = register(client, BEAT_LUA)
        self._finished = register(client, FINISHED_LUA)
        self._end = register(client, END_LUA)
        self._claim = register(client, CLAIM_LUA)
        self._delivered = register(client, DELIVERED_LUA)

    def _key(self, sid: str) -> str:
        return self._keys.stream(sid)

    async def track(self, sid: str, now: float) -> None:
        """List ``sid`` among the sessions a sweep looks at."""
        with redis_errors("relay track"):
            await self._track(keys=[self._listing], args=[sid, repr(float(now))])

    async def beat(self, sid: str, owner: str, now: float) -> bool:
        """Record that the relay of a closed stream is alive; False if missing, not owned or not ``on``."""
        with redis_errors("relay beat"):
            return bool(await self._beat(keys=[self._key(sid)], args=[owner, repr(float(now))]))

    async def finished(self, sid: str, outbox: str, now: float) -> bool:
        """The relay is over and ``outbox`` must be delivered; False if the session is missing."""
        with redis_errors("relay finished"):
            # listed first: should the outbox write then fail, a sweep only finds nothing to deliver
            await self._track(keys=[self._listing], args=[sid, repr(float(now))])
            if await self._finished(keys=[self._key(sid)], args=[outbox]):
                return True
            await self._client.zrem(self._listing, sid)
            return False

    async def end(self, sid: str) -> None:
        """The relay is over with nothing to deliver (a no-op unless it is ``on``)."""
        with redis_errors("relay end"):
            await self._end(keys=[self._key(sid)])

    async def claim(self, sid: str, node: str, now: float, lease: float, interrupted: str) -> str | None:
        """The text ``node`` must now deliver, or None (nothing to deliver, or another process claimed it)."""
        args = [node, repr(float(now)), repr(float(lease)), interrupted]
        with redis_errors("relay claim"):
            found = await self._claim(keys=[self._key(sid)], args=args)
            if int(found[0]) < 0:  # gone or settled: nothing will ever be delivered for it
                await self._client.zrem(self._listing, sid)
        return str(found[1]) if int(found[0]) > 0 else None

    async def delivered(self, sid: str, ok: bool) -> None:
        """Record the delivery's end, drop the outbox and the listing."""
        with redis_errors("relay delivered"):
            # recorded first: unlisted before that, a failed write would leave an outbox no sweep finds
            await self._delivered(keys=[self._key(sid)], args=[RELAY_DELIVERED if ok else RELAY_FAILED])
            await self._client.zrem(self._listing, sid)

    async def pending(self, now: float, limit: int = 1000) -> list[str]:
        """Listed stream ids, oldest first; entries older than a response_url's validity are dropped."""
        with redis_errors("relay pending"):
            await self._client.zremrangebyscore(self._listing, "-inf", repr(float(now - DELIVERY_VALIDITY)))
            found = await self._client.zrange(self._listing, 0, limit - 1)
        return [str(sid) for sid in found]


class MemoryRelayState:
    """The same over the in-process stream store (one process: nothing is awaited between read and write)."""

    def __init__(self, streams: StreamStore) -> None:
        self._streams = streams
        self._listing: dict[str, float] = {}

    async def track(self, sid: str, now: float) -> None:
        """List ``sid`` among the sessions a sweep looks at."""
        self._listing.setdefault(sid, now)

    async def beat(self, sid: str, owner: str, now: float) -> bool:
        """Record that the relay of a closed stream is alive; False if missing, not owned or not ``on``."""
        session = await self._streams.get(sid)
        if session is None or not owner or session.owner != owner or session.extra.get("relay") != RELAY_ON:
            return False
        return await self._streams.annotate(sid, {"beat": repr(float(now))})

    async def finished(self, sid: str, outbox: str, now: float) -> bool:
        """The relay is over and ``outbox`` must be delivered; False if the session is missing."""
        if not await self._streams.annotate(sid, {"relay": RELAY_FINISHED, "outbox": outbox}):
            return False
        self._listing.setdefault(sid, now)
        return True

    async def end(self, sid: str) -> None:
        """The relay is over with nothing to deliver (a no-op unless it is ``on``)."""
        session = await self._streams.get(sid)
        if session is not None and session.extra.get("relay") == RELAY_ON:
            await self._streams.annotate(sid, {"relay": RELAY_OVER})

    async def claim(self, sid: str, node: str, now: float, lease: float, interrupted: str) -> str | None:
        """The text ``node`` must now deliver, or None (nothing to deliver, or another process claimed it)."""
        session = await self._streams.get(sid)
        relay = session.extra.get("relay") if session is not None else None
        if session is None or relay not in (RELAY_ON, RELAY_FINISHED):
            self._listing.pop(sid, None)
            return None
        outbox = session.extra.get("outbox", "")
        if relay == RELAY_ON:
            if not now - _number(session.extra.get("beat", "")) > lease:
                return None
            outbox = interrupted
            await self._streams.annotate(sid, {"relay": RELAY_FINISHED, "outbox": outbox})
        elif "claim" in session.extra:
            if not now - _number(session.extra["claim"].rpartition(" ")[2]) > lease:
                return None
        await self._streams.annotate(sid, {"claim": f"{node} {now!r}"})
        return outbox

    async def delivered(self, sid: str, ok: bool) -> None:
        """Record the delivery's end, drop the outbox and the listing."""
        await self._streams.annotate(sid, {"relay": RELAY_DELIVERED if ok else RELAY_FAILED, "outbox": ""})
        self._listing.pop(sid, None)

    async def pending(self, now: float, limit: int = 1000) -> list[str]:
        """Listed stream ids, oldest first; entries older than a response_url's validity are dropped."""
        for sid, since in list(self._listing.items()):
            if now - since > DELIVERY_VALIDITY:
                del self._listing[sid]
        return sorted(self._listing, key=self._listing.__getitem__)[:limit]


def _number(value: str) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0
