"""The Redis stores shared by every laibao process.

Keys: see ``stores.keys``. A session hash holds its fields, ``n``, chunks ``c:{i}``, read flags
``r:{i}``, ``fin`` (final content delivered), ``ttl`` and extras ``x:{name}``.

Every read-modify-write is one Lua script (atomic, one round trip). Redis errors leave this module
as ``StoreError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from redis.crc import key_slot
from redis.typing import EncodableT, FieldT

from stores.base import DIFY_FIELDS, DONE, ERROR, QUEUED, STREAMING, TERMINAL, ChunkWrite, Snapshot, StreamSession
from stores.connection import Client, close, connect, describe, is_cluster, register
from stores.errors import redis_errors, ttl_ms
from stores.keys import DEFAULT_PREFIX, Keys

__all__ = ["RedisStores", "lua", "redis_errors", "ttl_ms"]


def lua(script: str) -> str:
    """A script with the status values filled in from Python (``$DONE`` ...), so both sides share them."""
    for name, value in (("$DONE", DONE), ("$ERROR", ERROR), ("$STREAMING", STREAMING), ("$QUEUED", QUEUED)):
        script = script.replace(name, f"'{value}'")
    return script

# ---------------------------------------------------------------------------------------------------
# Lua scripts. Times travel as Python float reprs and are stored verbatim, so both implementations
# compare exactly the same doubles. ``ttl`` (seconds) is kept in the hash so that every write can
# re-arm the key's expiry without the caller repeating it.

# Shared start of the owner-guarded writes (append, replace, finish, heartbeat, release).
# KEYS[1] stream key; ARGV[1] the caller's node id.
# Returns 0 early unless the session exists, is running and is owned by ARGV[1] (an empty owner owns
# nothing); otherwise leaves h = {status, owner, n, ttl} and refresh() for the body.
_OWNED_PRELUDE = """
local h = redis.call('HMGET', KEYS[1], 'status', 'owner', 'n', 'ttl')
if not h[1] or h[1] == $DONE or h[1] == $ERROR or ARGV[1] == '' or h[2] ~= ARGV[1] then
  return 0
end
local function refresh()
  local ttl = tonumber(h[4])
  if ttl and ttl > 0 then redis.call('PEXPIRE', KEYS[1], math.max(1, math.floor(ttl * 1000 + 0.5))) end
end
"""

APPEND_LUA = (
    """
-- KEYS[1] stream key
-- ARGV[1] owner, ARGV[2] chunk text, ARGV[3] now, ARGV[4] (optional) the index the chunk must get
-- returns 1 if the chunk was added (or, with ARGV[4], already was: a retried write is not doubled),
-- 0 if missing / not owned / terminal
"""
    + _OWNED_PRELUDE
    + """
local n = tonumber(h[3]) or 0
local want = tonumber(ARGV[4] or '')
-- the owner is the only writer, so a count already past the index means this very write landed
if want and want < n then return 1 end
redis.call('HSET', KEYS[1], 'c:' .. n, ARGV[2], 'r:' .. n, ARGV[3], 'n', n + 1,
           'status', $STREAMING, 'heartbeat', ARGV[3])
refresh()
return 1
"""
)

REPLACE_LUA = (
    """
-- KEYS[1] stream key
-- ARGV[1] owner, ARGV[2] the whole new content, ARGV[3] now
-- returns 1 if the content was replaced, 0 if missing / not owned / terminal
"""
    + _OWNED_PRELUDE
    + """
local n = tonumber(h[3]) or 0
local names = {}
-- chunk 0 is overwritten below; HDEL the rest in batches to stay under Lua's unpack() limit
for i = 1, n - 1 do
  names[#names + 1] = 'c:' .. i
  names[#names + 1] = 'r:' .. i
  if #names >= 1000 then
    redis.call('HDEL', KEYS[1], unpack(names))
    names = {}
  end
end
if #names > 0 then redis.call('HDEL', KEYS[1], unpack(names)) end
redis.call('HSET', KEYS[1], 'c:0', ARGV[2], 'r:0', ARGV[3], 'n', 1, 'status', $STREAMING, 'heartbeat', ARGV[3])
refresh()
return 1
"""
)

FINISH_LUA = (
    """
-- KEYS[1] stream key
-- ARGV[1] owner, ARGV[2] final status, ARGV[3] last chunk ('' for none), ARGV[4] now,
-- ARGV[5..] field name / value pairs to set
-- returns 1 if the session was finished (or ARGV[1] already finished it with this status: a retried
-- finish is not an ownership loss), 0 if missing / not owned / terminal
"""
    + """
local done = redis.call('HMGET', KEYS[1], 'status', 'owner')
if done[1] == ARGV[2] and ARGV[1] ~= '' and done[2] == ARGV[1] then return 1 end
"""
    + _OWNED_PRELUDE
    + """
local set = {'status', ARGV[2], 'heartbeat', ARGV[4]}
if ARGV[3] ~= '' then
  local n = tonumber(h[3]) or 0
  set[#set + 1] = 'c:' .. n
  set[#set + 1] = ARGV[3]
  set[#set + 1] = 'r:' .. n
  set[#set + 1] = ARGV[4]
  set[#set + 1] = 'n'
  set[#set + 1] = n + 1
end
for i = 5, #ARGV - 1, 2 do
  set[#set + 1] = ARGV[i]
  set[#set + 1] = ARGV[i + 1]
end
redis.call('HSET', KEYS[1], unpack(set))
refresh()
return 1
"""
)

HEARTBEAT_LUA = (
    """
-- KEYS[1] stream key
-- ARGV[1] owner, ARGV[2] now
-- returns 1 if the heartbeat was recorded, 0 if missing / not owned / terminal
"""
    + _OWNED_PRELUDE
    + """
redis.call('HSET', KEYS[1], 'heartbeat', ARGV[2])
refresh()
return 1
"""
)

RELEASE_LUA = (
    """
-- KEYS[1] stream key
-- ARGV[1] owner
-- returns 1 if the session is now unowned (owner '', heartbeat 0), 0 if missing / not owned / terminal
"""
    + _OWNED_PRELUDE
    + """
redis.call('HSET', KEYS[1], 'owner', '', 'heartbeat', '0')
refresh()
return 1
"""
)

COMMIT_LUA = """
-- KEYS[1..n] stream keys, one per write
-- ARGV[1] now; then per write i, from ARGV[2 + 4 * (i - 1)]: owner, text, chunk index, mode ('a' append, 'r' replace)
-- returns {r1, ..., rn}: 1 if write i was applied (an append whose index the count already passed
-- landed before a retry and is not applied again), 0 if its session is missing / not owned / terminal
local out = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local base = 2 + 4 * (i - 1)
  local owner, text, want, mode = ARGV[base], ARGV[base + 1], tonumber(ARGV[base + 2]), ARGV[base + 3]
  local h = redis.call('HMGET', key, 'status', 'owner', 'n', 'ttl')
  local ok = 0
  if h[1] and h[1] ~= $DONE and h[1] ~= $ERROR and owner ~= '' and h[2] == owner then
    local n = tonumber(h[3]) or 0
    ok = 1
    if mode == 'r' then
      local names = {}
      for k = 1, n - 1 do
        names[#names + 1] = 'c:' .. k
        names[#names + 1] = 'r:' .. k
        if #names >= 1000 then
          redis.call('HDEL', key, unpack(names))
          names = {}
        end
      end
      if #names > 0 then redis.call('HDEL', key, unpack(names)) end
      redis.call('HSET', key, 'c:0', text, 'r:0', ARGV[1], 'n', 1, 'status', $STREAMING, 'heartbeat', ARGV[1])
    elseif not (want < n) then
      redis.call('HSET', key, 'c:' .. n, text, 'r:' .. n, ARGV[1], 'n', n + 1, 'status', $STREAMING,
                 'heartbeat', ARGV[1])
    end
    local ttl = tonumber(h[4])
    if ttl and ttl > 0 then redis.call('PEXPIRE', key, math.max(1, math.floor(ttl * 1000 + 0.5))) end
  end
  out[i] = ok
end
return out
"""

TAKE_OVER_LUA = """
-- KEYS[1] stream key
-- ARGV[1] new owner, ARGV[2] now, ARGV[3] lease (seconds)
-- returns 1 if ARGV[1] now owns the session (it was running and unowned or its heartbeat older than
-- the lease), else 0; the script runs alone, so of several racers exactly one wins
local h = redis.call('HMGET', KEYS[1], 'status', 'owner', 'heartbeat', 'ttl')
if not h[1] or h[1] == $DONE or h[1] == $ERROR then return 0 end
local owner = h[2] or ''
if owner ~= '' and not (tonumber(ARGV[2]) - (tonumber(h[3]) or 0) > tonumber(ARGV[3])) then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'heartbeat', ARGV[2], 'status', $QUEUED)
local ttl = tonumber(h[4])
if ttl and ttl > 0 then redis.call('PEXPIRE', KEYS[1], math.max(1, math.floor(ttl * 1000 + 0.5))) end
return 1
"""

POLL_LUA = """
-- KEYS[1] stream key
-- ARGV[1] the polling bot ('' = any), ARGV[2] now ('' = not given)
-- returns nil if the session is missing or belongs to another bot (nothing changes then), else
--   {status, content, n, unread, owner, heartbeat, deadline, final_delivered (0/1),
--    items ('' unless this is the first poll to see it over), lags}
-- and marks every chunk read; a terminal status also marks the final content delivered ('fin').
-- A chunk's read flag r:{i} holds its write time until delivered, then 'd' .. the time of the first
-- poll that delivered it ('1' when no time was given); lags lists now - write time of those chunks
local h = redis.call('HMGET', KEYS[1], 'status', 'n', 'owner', 'heartbeat', 'deadline', 'fin', 'bot')
if not h[1] then return false end
if ARGV[1] ~= '' and h[7] ~= ARGV[1] then return false end
local n = tonumber(h[2]) or 0
local now = tonumber(ARGV[2] or '')
local mark = '1'
if now then mark = 'd' .. ARGV[2] end
local parts = {}
local unread = {}
local lags = {}
local i = 0
-- HMGET / HSET in batches so a long answer never exceeds Lua's unpack() limit
while i < n do
  local j = math.min(i + 1000, n)
  local names = {}
  for k = i, j - 1 do
    names[#names + 1] = 'c:' .. k
    names[#names + 1] = 'r:' .. k
  end
  local vals = redis.call('HMGET', KEYS[1], unpack(names))
  for k = 1, #names, 2 do
    parts[#parts + 1] = vals[k] or ''
    local flag = vals[k + 1] or ''
    if flag ~= '1' and string.sub(flag, 1, 1) ~= 'd' then
      unread[#unread + 1] = names[k + 1]
      unread[#unread + 1] = mark
      local written = tonumber(flag)
      if now and written and written > 0 then lags[#lags + 1] = tostring(now - written) end
    end
  end
  i = j
end
local count = #unread / 2
for k = 1, #unread, 2000 do
  redis.call('HSET', KEYS[1], unpack(unread, k, math.min(k + 1999, #unread)))
end
local fin = 0
if h[6] == '1' then fin = 1 end
if (h[1] == $DONE or h[1] == $ERROR) and fin == 0 then redis.call('HSET', KEYS[1], 'fin', '1') end
local items = ''
-- images go on the first finishing reply only, then leave the store: up to 10 base64 images must
-- not travel with every later poll
if (h[1] == $DONE or h[1] == $ERROR) and fin == 0 then
  items = redis.call('HGET', KEYS[1], 'x:items') or ''
  if items ~= '' then redis.call('HDEL', KEYS[1], 'x:items') end
end
return {h[1], table.concat(parts), n, count, h[3] or '', h[4] or '0', h[5] or '0', fin, items, lags}
"""

ANNOTATE_LUA = """
-- KEYS[1] stream key
-- ARGV field name / value pairs (Dify ids, or extras already named "x:...")
-- returns 1 if the fields were set, 0 if the session is missing (nothing is created)
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

GET_LUA = """
-- KEYS[1] stream key
-- ARGV none
-- returns the flat name/value list of every field except the chunks and read flags ({} if missing),
-- so reading a session's metadata never ships its whole answer
local names = {}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  local p = string.sub(f, 1, 2)
  if p ~= 'c:' and p ~= 'r:' then names[#names + 1] = f end
end
if #names == 0 then return {} end
local vals = redis.call('HMGET', KEYS[1], unpack(names))
local out = {}
for k = 1, #names do
  out[#out + 1] = names[k]
  out[#out + 1] = vals[k]
end
return out
"""

UNCLAIM_LUA = """
-- KEYS[1] msgid key
-- ARGV[1] stream id
-- returns 1 if the key held ARGV[1] and was deleted, else 0 (another claim stands)
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

CLAIM_LUA = """
-- KEYS[1] msgid key
-- ARGV[1] stream id, ARGV[2] ttl in milliseconds
-- returns the stream id stored now: ARGV[1] if this call stored it, else the earlier one
-- (a script rather than SET NX GET, which needs Redis 7)
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""

# Writes per COMMIT_LUA call: a script blocks Redis while it runs, so a huge batch goes as several
# calls in one pipeline (still one round trip).
COMMIT_GROUP = 200
# Script calls in flight at once for one commit on a cluster (one per slot): under the per-node pool.
COMMIT_PARALLEL = 16

# The session fields stored under their own names (sid is in the key, extras under "x:").
_TEXT_FIELDS = ("bot", "user", "chat", "query", "scope", "response_url", "owner", "status",
                "conversation_id", "message_id", "task_id")
_FLOAT_FIELDS = ("created", "deadline", "heartbeat")


def _float(value: str | None) -> float:
    return float(value) if value else 0.0


class RedisStreamStore:
    """Stream sessions as one Redis hash each."""

    def __init__(self, client: Client, keys: Keys) -> None:
        self._client = client
        self._keys = keys
        self._cluster = is_cluster(client)
        self._append = register(client, lua(APPEND_LUA))
        self._replace = register(client, lua(REPLACE_LUA))
        self._finish = register(client, lua(FINISH_LUA))
        self._heartbeat = register(client, lua(HEARTBEAT_LUA))
        self._release = register(client, lua(RELEASE_LUA))
        self._take_over = register(client, lua(TAKE_OVER_LUA))
        self._commit = register(client, lua(COMMIT_LUA))
        self._poll = register(client, lua(POLL_LUA))
        self._get = register(client, lua(GET_LUA))
        self._annotate = register(client, lua(ANNOTATE_LUA))

    def key(self, sid: str) -> str:
        """The hash key of a session."""
        return self._keys.stream(sid)

    async def create(self, session: StreamSession, ttl: float) -> None:
        """Store a new session (replacing any with the same id) that lives ``ttl`` s after each write."""
        px = ttl_ms(ttl)
        # typed as redis-py wants it: Mapping's key type is invariant, so dict[str, str] is refused
        mapping: dict[FieldT, EncodableT] = {name: getattr(session, name) for name in _TEXT_FIELDS}
        mapping.update({name: repr(float(getattr(session, name))) for name in _FLOAT_FIELDS})
        mapping["n"] = str(session.n)
        mapping["ttl"] = repr(float(ttl))
        mapping.update({f"x:{name}": value for name, value in session.extra.items()})
        key = self.key(session.sid)
        with redis_errors("create"):
            # DEL first so a reused id cannot inherit old chunks; MULTI keeps it one atomic round trip
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=mapping)
                pipe.pexpire(key, px)
                await pipe.execute()

    async def get(self, sid: str) -> StreamSession | None:
        """The session's fields without its chunks, or None if unknown or expired."""
        with redis_errors("get"):
            flat: list[str] = await self._get(keys=[self.key(sid)])
        if not flat:
            return None
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        return StreamSession(
            sid=sid,
            bot=fields.get("bot", ""),
            user=fields.get("user", ""),
            chat=fields.get("chat", ""),
            query=fields.get("query", ""),
            scope=fields.get("scope", ""),
            response_url=fields.get("response_url", ""),
            owner=fields.get("owner", ""),
            created=_float(fields.get("created")),
            deadline=_float(fields.get("deadline")),
            status=fields.get("status", ""),
            heartbeat=_float(fields.get("heartbeat")),
            conversation_id=fields.get("conversation_id", ""),
            message_id=fields.get("message_id", ""),
            task_id=fields.get("task_id", ""),
            n=int(fields.get("n") or 0),
            extra={name[2:]: value for name, value in fields.items() if name.startswith("x:")},
        )

    async def append(self, sid: str, owner: str, text: str, now: float) -> bool:
        """Add one chunk, mark the session streaming; False (no change) if missing, not owned or over."""
        with redis_errors("append"):
            return bool(await self._append(keys=[self.key(sid)], args=[owner, text, repr(float(now))]))

    async def commit(self, writes: Sequence[ChunkWrite], now: float) -> list[bool]:
        """Apply appends and replaces of many sessions in one script call; one result each.

        One round trip and one command for the whole batch, whatever its size. Each append carries
        the chunk index its writer expects, so a batch retried after a timeout (it may have run) adds
        nothing twice; a replace is idempotent anyway.
        """
        if not writes:
            return []
        stamp = repr(float(now))
        if self._cluster:
            return await self._commit_cluster(writes, stamp)
        groups = [writes[i:i + COMMIT_GROUP] for i in range(0, len(writes), COMMIT_GROUP)]
        with redis_errors("commit"):
            if len(groups) == 1:
                replies = [await self._commit_call(groups[0], stamp, self._client)]
            else:
                async with self._client.pipeline(transaction=False) as pipe:
                    for group in groups:
                        await self._commit_call(group, stamp, pipe)
                    replies = await pipe.execute()
        return [bool(result) for reply in replies for result in reply]

    async def _commit_cluster(self, writes: Sequence[ChunkWrite], stamp: str) -> list[bool]:
        """On a cluster a script call keeps to one slot: one call per slot (a scope's streams share
        one), a few at a time; each call is atomic for its streams, as the single call is elsewhere."""
        slots: dict[int, list[int]] = {}
        for i, write in enumerate(writes):
            slots.setdefault(key_slot(self.key(write.sid).encode()), []).append(i)
        results = [False] * len(writes)
        gate = asyncio.Semaphore(COMMIT_PARALLEL)

        async def one(indexes: list[int]) -> None:
            group = [writes[i] for i in indexes]
            async with gate:
                reply = await self._commit_call(group, stamp, self._client)
            for i, result in zip(indexes, reply, strict=True):
                results[i] = bool(result)

        with redis_errors("commit"):
            await asyncio.gather(*(one(indexes[k:k + COMMIT_GROUP]) for indexes in slots.values()
                                   for k in range(0, len(indexes), COMMIT_GROUP)))
        return results

    async def _commit_call(self, group: Sequence[ChunkWrite], stamp: str, client: Any) -> Any:
        args: list[EncodableT] = [stamp]
        for write in group:
            args += [write.owner, write.text, write.index, "r" if write.replace else "a"]
        return await self._commit(keys=[self.key(write.sid) for write in group], args=args, client=client)

    async def replace(self, sid: str, owner: str, text: str, now: float) -> bool:
        """Make ``text`` the whole content (one unread chunk); same guards as ``append``."""
        with redis_errors("replace"):
            return bool(await self._replace(keys=[self.key(sid)], args=[owner, text, repr(float(now))]))

    async def finish(
        self, sid: str, owner: str, status: str, text: str, fields: Mapping[str, str], now: float
    ) -> bool:
        """Atomically add a last chunk (if any), set DONE/ERROR and ``fields``; same guards as ``append``."""
        if status not in TERMINAL:
            raise ValueError(f"finish needs {DONE!r} or {ERROR!r}, not {status!r}")
        args: list[str] = [owner, status, text, repr(float(now))]
        for name, value in fields.items():
            args += [name if name in DIFY_FIELDS else f"x:{name}", value]
        with redis_errors("finish"):
            return bool(await self._finish(keys=[self.key(sid)], args=args))

    async def annotate(self, sid: str, fields: Mapping[str, str]) -> bool:
        """Set Dify ids or extras on an existing session, whoever owns it; False if it is missing."""
        if not fields:
            return True
        args: list[str] = []
        for name, value in fields.items():
            args += [name if name in DIFY_FIELDS else f"x:{name}", value]
        with redis_errors("annotate"):
            return bool(await self._annotate(keys=[self.key(sid)], args=args))

    async def heartbeat(self, sid: str, owner: str, now: float) -> bool:
        """Record that the owner is alive; False if missing, not owned or over."""
        with redis_errors("heartbeat"):
            return bool(await self._heartbeat(keys=[self.key(sid)], args=[owner, repr(float(now))]))

    async def poll(self, sid: str, bot: str = "", now: float | None = None) -> Snapshot | None:
        """Read everything in one round trip, marking the chunks read; None if unknown, expired or another bot's."""
        stamp = "" if now is None else repr(float(now))
        with redis_errors("poll"):
            reply: Sequence[Any] | None = await self._poll(keys=[self.key(sid)], args=[bot, stamp])
        if reply is None:
            return None
        status, content, n, unread, owner, heartbeat, deadline, fin, items, lags = reply
        return Snapshot(
            status=status,
            content=content,
            n=int(n),
            unread=int(unread),
            owner=owner,
            heartbeat=_float(heartbeat),
            deadline=_float(deadline),
            final_delivered=bool(fin),
            items=items,
            lags=tuple(float(lag) for lag in lags),
        )

    async def take_over(self, sid: str, new_owner: str, now: float, lease: float) -> bool:
        """Become the owner of an unowned or stale running session (one winner among racers)."""
        if not new_owner:
            raise ValueError("take_over needs a non-empty owner")
        with redis_errors("take_over"):
            return bool(
                await self._take_over(
                    keys=[self.key(sid)], args=[new_owner, repr(float(now)), repr(float(lease))]
                )
            )

    async def release(self, sid: str, owner: str) -> bool:
        """Give up a running session so another process can take it over at once."""
        with redis_errors("release"):
            return bool(await self._release(keys=[self.key(sid)], args=[owner]))


class RedisDedupeStore:
    """WeCom message ids as set-if-absent strings."""

    def __init__(self, client: Client, keys: Keys) -> None:
        self._keys = keys
        self._claim = register(client, lua(CLAIM_LUA))
        self._unclaim = register(client, lua(UNCLAIM_LUA))

    async def claim(self, bot: str, user: str, chat: str, msgid: str, sid: str, ttl: float) -> str:
        """Store ``sid`` for the sender's message if none is stored; return the stream id now stored."""
        px = ttl_ms(ttl)
        with redis_errors("claim"):
            return str(await self._claim(keys=[self._keys.msgid(bot, user, chat, msgid)], args=[sid, px]))

    async def unclaim(self, bot: str, user: str, chat: str, msgid: str, sid: str) -> bool:
        """Forget the message's claim if ``sid`` holds it, so a redelivery starts afresh."""
        with redis_errors("unclaim"):
            return bool(await self._unclaim(keys=[self._keys.msgid(bot, user, chat, msgid)], args=[sid]))


class RedisConversationStore:
    """Dify conversation ids as plain strings with a TTL."""

    def __init__(self, client: Client, keys: Keys) -> None:
        self._client = client
        self._keys = keys

    def _key(self, bot: str, scope: str) -> str:
        return self._keys.conversation(bot, scope)

    async def get(self, bot: str, scope: str) -> str | None:
        """The conversation id for the scope, or None."""
        with redis_errors("conversation get"):
            value = await self._client.get(self._key(bot, scope))
        # decode_responses=True: redis-py's typing still allows bytes
        return value.decode() if isinstance(value, bytes) else value

    async def set(self, bot: str, scope: str, conversation_id: str, ttl: float) -> None:
        """Remember the conversation id for ``ttl`` seconds."""
        px = ttl_ms(ttl)
        with redis_errors("conversation set"):
            await self._client.set(self._key(bot, scope), conversation_id, px=px)

    async def delete(self, bot: str, scope: str) -> None:
        """Forget the scope's conversation (``/new``)."""
        with redis_errors("conversation delete"):
            await self._client.delete(self._key(bot, scope))


class RedisStores:
    """All Redis-backed stores over one client (plain, Sentinel or Cluster: see ``stores.connection``)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        sentinel_password: str | None = None,
        connect_timeout: float = 2.0,
        timeout: float = 5.0,
        pool_size: int = 50,
        pool_timeout: float = 5.0,
    ) -> None:
        self.client: Client = connect(url, sentinel_password=sentinel_password, pool_size=pool_size,
                                      pool_timeout=pool_timeout, connect_timeout=connect_timeout, timeout=timeout)
        self.keys = Keys(prefix)
        self.streams = RedisStreamStore(self.client, self.keys)
        self.dedupe = RedisDedupeStore(self.client, self.keys)
        self.conversations = RedisConversationStore(self.client, self.keys)

    async def ping(self) -> None:
        """Raise StoreError if Redis cannot be reached."""
        with redis_errors("ping"):
            await self.client.ping()

    async def describe(self) -> str:
        """The mode and what it reached, for ``laibao check``."""
        return await describe(self.client)

    async def close(self) -> None:
        """Close the connections."""
        await close(self.client)
