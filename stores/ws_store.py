"""Long-connection mode's shared state: who holds each bot's connection, its live streams, sends to it.

Redis layout (all per bot ``b``):

| key | type | holds | TTL |
|---|---|---|---|
| ``laibao:ws:{b}:leader`` | string | node id of the process allowed to hold the connection | the lease |
| ``laibao:ws:{b}:term`` | string | the fencing token of the current lease | the lease |
| ``laibao:ws:{b}:fence`` | string | counter: every new lease gets the next token | none |
| ``laibao:ws:{b}:standdown`` | string | set when another client took the bot: nobody connects | the backoff |
| ``laibao:ws:{b}:live`` | hash | stream id → JSON {req, user, chat, at, fb} of streams to push | stream TTL |
| ``laibao:ws:{b}:send`` | list | JSON send requests from any process to the holder | 60 s |
| ``laibao:ws:reply:{id}`` | list | the holder's answer to one send request | 60 s |
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis

from stores.redis_store import redis_errors, ttl_ms

REQUEST_TTL = 60.0
BLOCK_SLICE = 2.0  # seconds one blocking pop may wait: well under the pool's socket timeout (5 s)

# KEYS: leader, term, fence, standdown; ARGV: node, ttl ms.
# Returns the new fencing token, or 0 when another node holds the lease or the cluster stands down.
ACQUIRE_LUA = """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
local token = redis.call('INCR', KEYS[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], token, 'PX', ARGV[2])
return token
"""

# KEYS: leader, term; ARGV: node, token, ttl ms. Returns 1 when renewed, 0 when the lease is no longer ours.
RENEW_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""

# KEYS: leader, term; ARGV: node, token. Returns 1 when released, 0 when it was not ours.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""


@dataclass(frozen=True)
class LiveStream:
    """A stream the connection holder pushes: the message's req_id and where a fallback goes."""

    sid: str
    req_id: str
    user: str
    chat: str
    at: float  # unix seconds the message arrived
    feedback_sent: bool = False  # the first frame (with feedback.id) was acked

    def dump(self) -> str:
        """The JSON stored for it."""
        return json.dumps({"req": self.req_id, "user": self.user, "chat": self.chat, "at": self.at,
                           "fb": self.feedback_sent})

    @classmethod
    def load(cls, sid: str, raw: str) -> LiveStream | None:
        """Parse a stored entry; None when it is unreadable."""
        try:
            obj = json.loads(raw)
            return cls(sid, str(obj["req"]), str(obj["user"]), str(obj["chat"]), float(obj["at"]), bool(obj["fb"]))
        except (ValueError, KeyError, TypeError):
            return None


class WsStore(Protocol):
    """The cluster-wide state of long-connection bots."""

    async def acquire(self, bot: str, node: str, ttl: float) -> int:
        """Take the bot's lease if it is free (or ours); its fencing token, or 0."""
        ...

    async def renew(self, bot: str, node: str, token: int, ttl: float) -> bool:
        """Extend our lease; False when it is no longer ours."""
        ...

    async def release(self, bot: str, node: str, token: int) -> bool:
        """Give the lease up at once; False when it was not ours."""
        ...

    async def holder(self, bot: str) -> tuple[str, int, float] | None:
        """(node, token, seconds left) of the bot's lease, or None."""
        ...

    async def stand_down(self, bot: str, seconds: float) -> None:
        """Keep every process from connecting for ``seconds``."""
        ...

    async def standing_down(self, bot: str) -> float:
        """Seconds left of a stand-down (0 when none)."""
        ...

    async def add_live(self, stream: LiveStream, bot: str, ttl: float) -> bool:
        """Register a stream to push; False when it is registered already."""
        ...

    async def update_live(self, stream: LiveStream, bot: str) -> None:
        """Store a registered stream's new state (if it is still registered)."""
        ...

    async def live(self, bot: str) -> list[LiveStream]:
        """Every registered stream of the bot."""
        ...

    async def drop_live(self, bot: str, sid: str) -> None:
        """Stop pushing a stream."""
        ...

    async def post_send(self, bot: str, request: str) -> None:
        """Queue a send request for the bot's holder."""
        ...

    async def take_send(self, bot: str, wait: float) -> str | None:
        """The oldest queued send request, waiting up to ``wait`` seconds; None when there is none."""
        ...

    async def withdraw_send(self, bot: str, request: str) -> bool:
        """Remove a request nobody took yet; False when the holder took it already."""
        ...

    async def answer_send(self, request_id: str, answer: str) -> None:
        """The holder's answer to one request."""
        ...

    async def send_answer(self, request_id: str, wait: float) -> str | None:
        """Wait up to ``wait`` seconds for a request's answer."""
        ...


class RedisWsStore:
    """The shared state in Redis, for several processes."""

    def __init__(self, client: aioredis.Redis, prefix: str = "laibao") -> None:
        self._client = client
        self._prefix = prefix
        self._acquire = client.register_script(ACQUIRE_LUA)
        self._renew = client.register_script(RENEW_LUA)
        self._release = client.register_script(RELEASE_LUA)

    def _key(self, bot: str, name: str) -> str:
        return f"{self._prefix}:ws:{bot}:{name}"

    def _lease_keys(self, bot: str) -> list[str]:
        return [self._key(bot, "leader"), self._key(bot, "term")]

    async def acquire(self, bot: str, node: str, ttl: float) -> int:
        """Take the bot's lease if it is free (or ours); its fencing token, or 0."""
        keys = [*self._lease_keys(bot), self._key(bot, "fence"), self._key(bot, "standdown")]
        with redis_errors("ws lease acquire"):
            return int(await self._acquire(keys=keys, args=[node, ttl_ms(ttl)]))

    async def renew(self, bot: str, node: str, token: int, ttl: float) -> bool:
        """Extend our lease; False when it is no longer ours."""
        with redis_errors("ws lease renew"):
            return bool(await self._renew(keys=self._lease_keys(bot), args=[node, str(token), ttl_ms(ttl)]))

    async def release(self, bot: str, node: str, token: int) -> bool:
        """Give the lease up at once; False when it was not ours."""
        with redis_errors("ws lease release"):
            return bool(await self._release(keys=self._lease_keys(bot), args=[node, str(token)]))

    async def holder(self, bot: str) -> tuple[str, int, float] | None:
        """(node, token, seconds left) of the bot's lease, or None."""
        leader, term = self._lease_keys(bot)
        with redis_errors("ws lease read"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.get(leader)
                pipe.get(term)
                pipe.pttl(leader)
                node, token, left = await pipe.execute()
        if not node:
            return None
        return str(node), int(token or 0), max(0.0, int(left) / 1000)

    async def stand_down(self, bot: str, seconds: float) -> None:
        """Keep every process from connecting for ``seconds``."""
        with redis_errors("ws stand-down"):
            await self._client.set(self._key(bot, "standdown"), "1", px=ttl_ms(seconds))

    async def standing_down(self, bot: str) -> float:
        """Seconds left of a stand-down (0 when none)."""
        with redis_errors("ws stand-down read"):
            left = await self._client.pttl(self._key(bot, "standdown"))
        return max(0.0, int(left) / 1000)

    async def add_live(self, stream: LiveStream, bot: str, ttl: float) -> bool:
        """Register a stream to push; False when it is registered already."""
        key = self._key(bot, "live")
        with redis_errors("ws live add"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hsetnx(key, stream.sid, stream.dump())
                pipe.pexpire(key, ttl_ms(ttl))
                added, _ = await pipe.execute()
        return bool(added)

    async def update_live(self, stream: LiveStream, bot: str) -> None:
        """Store a registered stream's new state (if it is still registered)."""
        key = self._key(bot, "live")
        with redis_errors("ws live update"):
            if await self._client.hexists(key, stream.sid):
                await self._client.hset(key, stream.sid, stream.dump())

    async def live(self, bot: str) -> list[LiveStream]:
        """Every registered stream of the bot."""
        with redis_errors("ws live read"):
            entries = await self._client.hgetall(self._key(bot, "live"))
        streams = (LiveStream.load(str(sid), str(raw)) for sid, raw in entries.items())
        return [s for s in streams if s is not None]

    async def drop_live(self, bot: str, sid: str) -> None:
        """Stop pushing a stream."""
        with redis_errors("ws live drop"):
            await self._client.hdel(self._key(bot, "live"), sid)

    async def post_send(self, bot: str, request: str) -> None:
        """Queue a send request for the bot's holder."""
        key = self._key(bot, "send")
        with redis_errors("ws send post"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.rpush(key, request)
                pipe.pexpire(key, ttl_ms(REQUEST_TTL))
                await pipe.execute()

    async def take_send(self, bot: str, wait: float) -> str | None:
        """The oldest queued send request, waiting up to ``wait`` seconds; None when there is none."""
        return await self._pop(self._key(bot, "send"), wait, "ws send take")

    async def withdraw_send(self, bot: str, request: str) -> bool:
        """Remove a request nobody took yet; False when the holder took it already."""
        with redis_errors("ws send withdraw"):
            return bool(await self._client.lrem(self._key(bot, "send"), 1, request))

    async def answer_send(self, request_id: str, answer: str) -> None:
        """The holder's answer to one request."""
        key = f"{self._prefix}:ws:reply:{request_id}"
        with redis_errors("ws send answer"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.rpush(key, answer)
                pipe.pexpire(key, ttl_ms(REQUEST_TTL))
                await pipe.execute()

    async def send_answer(self, request_id: str, wait: float) -> str | None:
        """Wait up to ``wait`` seconds for a request's answer."""
        return await self._pop(f"{self._prefix}:ws:reply:{request_id}", wait, "ws send answer read")

    async def _pop(self, key: str, wait: float, operation: str) -> str | None:
        """BLPOP in slices, so no single call outlasts the socket timeout."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            with redis_errors(operation):
                # BLPOP's timeout is whole or fractional seconds; 0 would mean "for ever".
                item = await self._client.blpop([key], timeout=max(0.01, min(left, BLOCK_SLICE)))
            if item:
                return str(item[1])
            if deadline - time.monotonic() <= 0:
                return None


class MemoryWsStore:
    """The same state for one process (no Redis): it always gets the lease."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._leases: dict[str, tuple[str, int, float]] = {}
        self._fence = 0
        self._standdown: dict[str, float] = {}
        self._live: dict[str, dict[str, str]] = {}
        self._sends: dict[str, list[str]] = {}
        self._answers: dict[str, str] = {}

    def _current(self, bot: str) -> tuple[str, int, float] | None:
        lease = self._leases.get(bot)
        if lease is not None and lease[2] <= self._clock():
            del self._leases[bot]
            return None
        return lease

    async def acquire(self, bot: str, node: str, ttl: float) -> int:
        """Take the bot's lease if it is free (or ours); its fencing token, or 0."""
        if await self.standing_down(bot):
            return 0
        lease = self._current(bot)
        if lease is not None and lease[0] != node:
            return 0
        self._fence += 1
        self._leases[bot] = (node, self._fence, self._clock() + ttl)
        return self._fence

    async def renew(self, bot: str, node: str, token: int, ttl: float) -> bool:
        """Extend our lease; False when it is no longer ours."""
        lease = self._current(bot)
        if lease is None or lease[:2] != (node, token):
            return False
        self._leases[bot] = (node, token, self._clock() + ttl)
        return True

    async def release(self, bot: str, node: str, token: int) -> bool:
        """Give the lease up at once; False when it was not ours."""
        lease = self._current(bot)
        if lease is None or lease[:2] != (node, token):
            return False
        del self._leases[bot]
        return True

    async def holder(self, bot: str) -> tuple[str, int, float] | None:
        """(node, token, seconds left) of the bot's lease, or None."""
        lease = self._current(bot)
        return None if lease is None else (lease[0], lease[1], lease[2] - self._clock())

    async def stand_down(self, bot: str, seconds: float) -> None:
        """Keep this process from connecting for ``seconds``."""
        self._standdown[bot] = self._clock() + seconds

    async def standing_down(self, bot: str) -> float:
        """Seconds left of a stand-down (0 when none)."""
        return max(0.0, self._standdown.get(bot, 0.0) - self._clock())

    async def add_live(self, stream: LiveStream, bot: str, ttl: float) -> bool:
        """Register a stream to push; False when it is registered already."""
        streams = self._live.setdefault(bot, {})
        if stream.sid in streams:
            return False
        streams[stream.sid] = stream.dump()
        return True

    async def update_live(self, stream: LiveStream, bot: str) -> None:
        """Store a registered stream's new state (if it is still registered)."""
        streams = self._live.get(bot, {})
        if stream.sid in streams:
            streams[stream.sid] = stream.dump()

    async def live(self, bot: str) -> list[LiveStream]:
        """Every registered stream of the bot."""
        streams = (LiveStream.load(sid, raw) for sid, raw in self._live.get(bot, {}).items())
        return [s for s in streams if s is not None]

    async def drop_live(self, bot: str, sid: str) -> None:
        """Stop pushing a stream."""
        self._live.get(bot, {}).pop(sid, None)

    async def post_send(self, bot: str, request: str) -> None:
        """Queue a send request."""
        self._sends.setdefault(bot, []).append(request)

    async def take_send(self, bot: str, wait: float) -> str | None:
        """The oldest queued send request, waiting up to ``wait`` seconds."""
        give_up = self._clock() + wait
        while True:
            queue = self._sends.get(bot)
            if queue:
                return queue.pop(0)
            if self._clock() >= give_up:
                return None
            await asyncio.sleep(0.05)

    async def withdraw_send(self, bot: str, request: str) -> bool:
        """Remove a request nobody took yet."""
        queue = self._sends.get(bot, [])
        if request in queue:
            queue.remove(request)
            return True
        return False

    async def answer_send(self, request_id: str, answer: str) -> None:
        """The answer to one request."""
        self._answers[request_id] = answer

    async def send_answer(self, request_id: str, wait: float) -> str | None:
        """Wait up to ``wait`` seconds for a request's answer."""
        give_up = self._clock() + wait
        while request_id not in self._answers:
            if self._clock() >= give_up:
                return None
            await asyncio.sleep(0.05)
        return self._answers.pop(request_id)
