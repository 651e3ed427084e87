"""The store Protocols and the value types they exchange.

Every store has a Redis implementation (shared by all processes) and an in-memory one (one process
only); ``tests/test_stores.py`` runs one contract suite against both, so code written against these
Protocols behaves the same on either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

QUEUED, STREAMING, DONE, ERROR = "queued", "streaming", "done", "error"
TERMINAL = frozenset({DONE, ERROR})

# Names ``StreamStore.finish`` stores as first-class session fields; any other name it is given lands
# in ``StreamSession.extra``, so a caller can never overwrite the owner, status or chunks that way.
DIFY_FIELDS = frozenset({"conversation_id", "message_id", "task_id"})


@dataclass(frozen=True)
class StreamSession:
    """One WeCom stream: the question, who relays it, and where the answer stands."""

    sid: str
    bot: str
    user: str
    chat: str = ""  # "" in a single chat
    query: str = ""
    scope: str = ""  # conversation scope key
    response_url: str = ""
    owner: str = ""  # node id of the process relaying it
    created: float = 0.0  # unix seconds
    deadline: float = 0.0
    status: str = QUEUED
    heartbeat: float = 0.0
    conversation_id: str = ""
    message_id: str = ""
    task_id: str = ""
    n: int = 0  # chunk count
    extra: Mapping[str, str] = field(default_factory=dict)  # any other fields (stored as "x:{name}")


@dataclass(frozen=True)
class ChunkWrite:
    """One stream's pending answer text in a batch commit: appended as chunk ``index``, or replacing all."""

    sid: str
    owner: str
    text: str
    index: int = 0  # the chunk index the writer expects (ignored by a replace)
    replace: bool = False


@dataclass(frozen=True)
class Snapshot:
    """What one refresh poll sees."""

    status: str
    content: str  # all chunks concatenated in order
    n: int  # chunk count
    unread: int  # how many chunks this poll was the first to read
    owner: str
    heartbeat: float
    deadline: float
    final_delivered: bool  # an EARLIER poll already returned this session in a terminal status
    items: str = ""  # on the first poll that sees it finished: the extra "items" (images, JSON), then dropped
    # per chunk this poll was the first to deliver: seconds since it was written (when ``now`` was given)
    lags: tuple[float, ...] = ()

    @property
    def finished(self) -> bool:
        """True once the session is done or failed."""
        return self.status in TERMINAL


class StreamStore(Protocol):
    """Stream sessions: created by the callback, written by the owner's relay, read by polls."""

    async def create(self, session: StreamSession, ttl: float) -> None:
        """Store a new session (replacing any with the same id) that lives ``ttl`` s after each write."""
        ...

    async def get(self, sid: str) -> StreamSession | None:
        """The session's fields without its chunks, or None if unknown or expired."""
        ...

    async def append(self, sid: str, owner: str, text: str, now: float) -> bool:
        """Add one chunk, mark the session streaming; False (no change) if missing, not owned or over."""
        ...

    async def replace(self, sid: str, owner: str, text: str, now: float) -> bool:
        """Make ``text`` the whole content (one unread chunk); same guards as ``append``."""
        ...

    async def commit(self, writes: Sequence[ChunkWrite], now: float) -> list[bool]:
        """Apply the appends and replaces of many sessions at once (one round trip); a result per write.

        An append whose ``index`` the session's chunk count already passed is not applied again (it
        landed before a retry), and a retried ``finish`` of the same owner and status reports True.
        """
        ...

    async def finish(
        self, sid: str, owner: str, status: str, text: str, fields: Mapping[str, str], now: float
    ) -> bool:
        """Atomically add a last chunk (if any), set DONE/ERROR and ``fields``; same guards as ``append``."""
        ...

    async def heartbeat(self, sid: str, owner: str, now: float) -> bool:
        """Record that the owner is alive; False if missing, not owned or over."""
        ...

    async def annotate(self, sid: str, fields: Mapping[str, str]) -> bool:
        """Set Dify ids or extras on an existing session, whoever owns it; False if it is missing."""
        ...

    async def poll(self, sid: str, bot: str = "", now: float | None = None) -> Snapshot | None:
        """Read everything in one round trip, marking the chunks read; None if unknown, expired or (when
        ``bot`` is given) another bot's, which then changes nothing. With ``now``, each chunk's read
        flag records when it was first delivered, and the snapshot's ``lags`` how long after its write."""
        ...

    async def take_over(self, sid: str, new_owner: str, now: float, lease: float) -> bool:
        """Become the owner of an unowned or stale running session (one winner among racers)."""
        ...

    async def release(self, sid: str, owner: str) -> bool:
        """Give up a running session so another process can take it over at once."""
        ...


class DedupeStore(Protocol):
    """WeCom message ids already seen, so a redelivered callback finds its stream."""

    async def claim(self, bot: str, user: str, chat: str, msgid: str, sid: str, ttl: float) -> str:
        """Store ``sid`` for the message if none is stored; return the stream id now stored.

        The claim is the sender's: another user (or chat) reusing the msgid claims another key.
        """
        ...

    async def unclaim(self, bot: str, user: str, chat: str, msgid: str, sid: str) -> bool:
        """Drop the claim if ``sid`` holds it (its session could not be recorded); True if dropped."""
        ...


class ConversationStore(Protocol):
    """The Dify conversation each WeCom scope continues."""

    async def get(self, bot: str, scope: str) -> str | None:
        """The conversation id for the scope, or None."""
        ...

    async def set(self, bot: str, scope: str, conversation_id: str, ttl: float) -> None:
        """Remember the conversation id for ``ttl`` seconds."""
        ...

    async def delete(self, bot: str, scope: str) -> None:
        """Forget the scope's conversation (``/new``)."""
        ...


class Stores(Protocol):
    """What the app builds once and closes on shutdown."""

    # Read-only properties rather than plain attributes: a Protocol attribute is invariant, so an
    # implementation could not declare its own concrete store types; properties accept subtypes.
    @property
    def streams(self) -> StreamStore:
        """The stream sessions."""
        ...

    @property
    def dedupe(self) -> DedupeStore:
        """The message-id deduplication."""
        ...

    @property
    def conversations(self) -> ConversationStore:
        """The Dify conversations per scope."""
        ...

    async def ping(self) -> None:
        """Raise StoreError if the backing store cannot be reached."""
        ...

    async def close(self) -> None:
        """Release connections; the stores are unusable afterwards."""
        ...
