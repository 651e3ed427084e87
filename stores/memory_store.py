"""The in-process stores: the same semantics as the Redis ones, for a single laibao process.

No method awaits anything, so each runs to completion on the event loop without interleaving: that
is what makes them as atomic as the Redis scripts. Entries expire lazily on ``clock()`` (wall time,
like Redis TTLs), and each map holds at most ``max_entries``, evicting expired entries first and then
the one closest to expiry.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from stores.base import (
    DIFY_FIELDS,
    DONE,
    ERROR,
    QUEUED,
    STREAMING,
    TERMINAL,
    ChunkWrite,
    Snapshot,
    StreamSession,
)
from stores.keys import Keys

V = TypeVar("V")
_KEYS = Keys()  # the maps are keyed by the Redis key names, so the same parts collide and no others

Clock = Callable[[], float]


class ExpiringMap(Generic[V]):
    """A bounded dict whose entries expire ``ttl`` seconds after they were last stored or touched."""

    def __init__(self, max_entries: int, clock: Clock) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self._max = max_entries
        self._clock = clock
        self._items: dict[str, tuple[float, V]] = {}
        # (expires_at, key) for every store/touch; an entry is stale once the key's expiry moved on,
        # which is cheaper than deleting from the middle of a heap
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> V | None:
        """The live value under ``key``, or None."""
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= self._clock():
            del self._items[key]
            return None
        return item[1]

    def put(self, key: str, value: V, ttl: float) -> None:
        """Store ``value`` for ``ttl`` seconds, making room if the map is full."""
        now = self._clock()
        self._purge(now)
        if key not in self._items and len(self._items) >= self._max:
            self._evict_one()
        self._set(key, value, now + ttl)

    def touch(self, key: str, ttl: float) -> None:
        """Let a present entry live ``ttl`` seconds from now."""
        item = self._items.get(key)
        if item is not None:
            self._set(key, item[1], self._clock() + ttl)

    def pop(self, key: str) -> None:
        """Remove ``key`` if present."""
        self._items.pop(key, None)

    def _set(self, key: str, value: V, expires: float) -> None:
        self._items[key] = (expires, value)
        heapq.heappush(self._heap, (expires, key))
        # rebuild when stale heap entries (one per touch) outnumber the live ones
        if len(self._heap) > 2 * len(self._items) + 64:
            self._heap = [(exp, k) for k, (exp, _) in self._items.items()]
            heapq.heapify(self._heap)

    def _is_current(self, expires: float, key: str) -> bool:
        item = self._items.get(key)
        return item is not None and item[0] == expires

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expires, key = heapq.heappop(self._heap)
            if self._is_current(expires, key):
                del self._items[key]

    def _evict_one(self) -> None:
        while self._heap:
            expires, key = heapq.heappop(self._heap)
            if self._is_current(expires, key):
                del self._items[key]
                return


@dataclass
class _Session:
    """A stream session as the memory store keeps it (the Redis hash, as Python values)."""

    bot: str
    user: str
    chat: str
    query: str
    scope: str
    response_url: str
    owner: str
    created: float
    deadline: float
    status: str
    heartbeat: float
    conversation_id: str
    message_id: str
    task_id: str
    extra: dict[str, str]
    ttl: float
    chunks: list[str] = field(default_factory=list)
    read: list[bool] = field(default_factory=list)
    written: list[float] = field(default_factory=list)  # when each chunk was written (0: unknown)
    fin: bool = False  # a poll has returned the terminal status


class MemoryStreamStore:
    """Stream sessions in a bounded, expiring dict."""

    def __init__(self, max_entries: int, clock: Clock) -> None:
        self._sessions: ExpiringMap[_Session] = ExpiringMap(max_entries, clock)

    def _owned(self, sid: str, owner: str) -> _Session | None:
        """The session if it is running and ``owner`` owns it (an empty owner owns nothing)."""
        session = self._sessions.get(sid)
        if session is None or session.status in TERMINAL or not owner or session.owner != owner:
            return None
        return session

    async def create(self, session: StreamSession, ttl: float) -> None:
        """Store a new session (replacing any with the same id) that lives ``ttl`` s after each write."""
        _check_ttl(ttl)
        record = _Session(
            bot=session.bot,
            user=session.user,
            chat=session.chat,
            query=session.query,
            scope=session.scope,
            response_url=session.response_url,
            owner=session.owner,
            created=float(session.created),
            deadline=float(session.deadline),
            status=session.status,
            heartbeat=float(session.heartbeat),
            conversation_id=session.conversation_id,
            message_id=session.message_id,
            task_id=session.task_id,
            extra=dict(session.extra),
            ttl=float(ttl),
            # as in Redis, a count without chunk fields reads as that many empty, unread chunks
            chunks=[""] * session.n,
            read=[False] * session.n,
            written=[0.0] * session.n,
        )
        self._sessions.put(session.sid, record, ttl)

    async def get(self, sid: str) -> StreamSession | None:
        """The session's fields without its chunks, or None if unknown or expired."""
        s = self._sessions.get(sid)
        if s is None:
            return None
        return StreamSession(
            sid=sid,
            bot=s.bot,
            user=s.user,
            chat=s.chat,
            query=s.query,
            scope=s.scope,
            response_url=s.response_url,
            owner=s.owner,
            created=s.created,
            deadline=s.deadline,
            status=s.status,
            heartbeat=s.heartbeat,
            conversation_id=s.conversation_id,
            message_id=s.message_id,
            task_id=s.task_id,
            n=len(s.chunks),
            extra=dict(s.extra),
        )

    async def commit(self, writes: Sequence[ChunkWrite], now: float) -> list[bool]:
        """Apply appends and replaces of many sessions; one result each (as the Redis pipeline)."""
        results = []
        for write in writes:
            if write.replace:
                results.append(await self.replace(write.sid, write.owner, write.text, now))
            else:
                results.append(await self.append(write.sid, write.owner, write.text, now, write.index))
        return results

    async def append(self, sid: str, owner: str, text: str, now: float, index: int | None = None) -> bool:
        """Add one chunk, mark the session streaming; False (no change) if missing, not owned or over.

        With ``index``, a chunk count already past it means this write landed before: nothing is added.
        """
        s = self._owned(sid, owner)
        if s is None:
            return False
        if index is not None and index < len(s.chunks):
            return True
        s.chunks.append(text)
        s.read.append(False)
        s.written.append(float(now))
        s.status = STREAMING
        s.heartbeat = float(now)
        self._sessions.touch(sid, s.ttl)
        return True

    async def replace(self, sid: str, owner: str, text: str, now: float) -> bool:
        """Make ``text`` the whole content (one unread chunk); same guards as ``append``."""
        s = self._owned(sid, owner)
        if s is None:
            return False
        s.chunks = [text]
        s.read = [False]
        s.written = [float(now)]
        s.status = STREAMING
        s.heartbeat = float(now)
        self._sessions.touch(sid, s.ttl)
        return True

    async def finish(
        self, sid: str, owner: str, status: str, text: str, fields: Mapping[str, str], now: float
    ) -> bool:
        """Atomically add a last chunk (if any), set DONE/ERROR and ``fields``; same guards as ``append``."""
        if status not in TERMINAL:
            raise ValueError(f"finish needs {DONE!r} or {ERROR!r}, not {status!r}")
        done = self._sessions.get(sid)
        if done is not None and owner and done.owner == owner and done.status == status:
            return True  # a retried finish of this owner's, as in Redis
        s = self._owned(sid, owner)
        if s is None:
            return False
        if text:
            s.chunks.append(text)
            s.read.append(False)
            s.written.append(float(now))
        s.status = status
        s.heartbeat = float(now)
        for name, value in fields.items():
            if name in DIFY_FIELDS:
                setattr(s, name, value)
            else:
                s.extra[name] = value
        self._sessions.touch(sid, s.ttl)
        return True

    async def annotate(self, sid: str, fields: Mapping[str, str]) -> bool:
        """Set Dify ids or extras on an existing session, whoever owns it; False if it is missing."""
        s = self._sessions.get(sid)
        if s is None:
            return False
        for name, value in fields.items():
            if name in DIFY_FIELDS:
                setattr(s, name, value)
            else:
                s.extra[name] = value
        return True

    async def heartbeat(self, sid: str, owner: str, now: float) -> bool:
        """Record that the owner is alive; False if missing, not owned or over."""
        s = self._owned(sid, owner)
        if s is None:
            return False
        s.heartbeat = float(now)
        self._sessions.touch(sid, s.ttl)
        return True

    async def poll(self, sid: str, bot: str = "", now: float | None = None) -> Snapshot | None:
        """Read everything, marking the chunks read; None if unknown, expired or another bot's."""
        s = self._sessions.get(sid)
        if s is None or (bot and s.bot != bot):
            return None
        unread = s.read.count(False)
        lags = () if now is None else tuple(
            now - written for written, read in zip(s.written, s.read, strict=True) if not read and written > 0)
        s.read = [True] * len(s.chunks)
        delivered = s.fin
        if s.status in TERMINAL:
            s.fin = True
        return Snapshot(
            status=s.status,
            content="".join(s.chunks),
            n=len(s.chunks),
            unread=unread,
            owner=s.owner,
            heartbeat=s.heartbeat,
            deadline=s.deadline,
            final_delivered=delivered,
            # as in Redis: the images go with the first finishing reply only
            items=s.extra.pop("items", "") if s.status in TERMINAL and not delivered else "",
            lags=lags,
        )

    async def take_over(self, sid: str, new_owner: str, now: float, lease: float) -> bool:
        """Become the owner of an unowned or stale running session (one winner among racers)."""
        if not new_owner:
            raise ValueError("take_over needs a non-empty owner")
        s = self._sessions.get(sid)
        if s is None or s.status in TERMINAL:
            return False
        if s.owner and not now - s.heartbeat > lease:
            return False
        s.owner = new_owner
        s.heartbeat = float(now)
        s.status = QUEUED
        self._sessions.touch(sid, s.ttl)
        return True

    async def release(self, sid: str, owner: str) -> bool:
        """Give up a running session so another process can take it over at once."""
        s = self._owned(sid, owner)
        if s is None:
            return False
        s.owner = ""
        s.heartbeat = 0.0
        self._sessions.touch(sid, s.ttl)
        return True


class MemoryDedupeStore:
    """WeCom message ids in a bounded, expiring dict."""

    def __init__(self, max_entries: int, clock: Clock) -> None:
        self._claims: ExpiringMap[str] = ExpiringMap(max_entries, clock)

    async def claim(self, bot: str, user: str, chat: str, msgid: str, sid: str, ttl: float) -> str:
        """Store ``sid`` for the sender's message if none is stored; return the stream id now stored."""
        _check_ttl(ttl)
        key = _KEYS.msgid(bot, user, chat, msgid)  # the Redis key names: the same tuples collide, no others
        current = self._claims.get(key)
        if current is not None:
            return current
        self._claims.put(key, sid, ttl)
        return sid

    async def unclaim(self, bot: str, user: str, chat: str, msgid: str, sid: str) -> bool:
        """Forget the message's claim if ``sid`` holds it, so a redelivery starts afresh."""
        key = _KEYS.msgid(bot, user, chat, msgid)
        if self._claims.get(key) != sid:
            return False
        self._claims.pop(key)
        return True


class MemoryConversationStore:
    """Dify conversation ids in a bounded, expiring dict."""

    def __init__(self, max_entries: int, clock: Clock) -> None:
        self._conversations: ExpiringMap[str] = ExpiringMap(max_entries, clock)

    async def get(self, bot: str, scope: str) -> str | None:
        """The conversation id for the scope, or None."""
        return self._conversations.get(_KEYS.conversation(bot, scope))

    async def set(self, bot: str, scope: str, conversation_id: str, ttl: float) -> None:
        """Remember the conversation id for ``ttl`` seconds."""
        _check_ttl(ttl)
        self._conversations.put(_KEYS.conversation(bot, scope), conversation_id, ttl)

    async def delete(self, bot: str, scope: str) -> None:
        """Forget the scope's conversation (``/new``)."""
        self._conversations.pop(_KEYS.conversation(bot, scope))


class MemoryStores:
    """All stores in this process's memory (the embedded default: one process only)."""

    def __init__(self, *, max_entries: int = 100_000, clock: Clock = time.time) -> None:
        self.streams = MemoryStreamStore(max_entries, clock)
        self.dedupe = MemoryDedupeStore(max_entries, clock)
        self.conversations = MemoryConversationStore(max_entries, clock)

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Nothing to release."""


def _check_ttl(ttl: float) -> None:
    # the same refusal as the Redis store, whose PX needs a positive number
    if not ttl > 0:
        raise ValueError(f"ttl must be positive, not {ttl!r}")
