"""Answer text on its way to the store: per-stream coalescing, and one process-wide group commit.

Every live stream on a process has a ``StreamWriter`` that collects Dify's deltas. The process's one
``Flusher`` commits what all of them have pending in one pipelined round trip per tick (at most one per
``interval``, sooner when a stream has ``max_bytes`` waiting), instead of one store call per stream per
delta. A stream's writes stay in order: a tick starts only after the previous one returned, and a
stream's text is in at most one tick at a time. Each write keeps the owner check of the store scripts;
a write refused for ownership makes the stream's next ``add`` raise ``OwnershipLost``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from laibao.answer.retry import retrying
from laibao.errors import OwnershipLost, StoreError
from stores.base import DONE, ChunkWrite, StreamStore

log = logging.getLogger("laibao.answer")

MAX_BACKOFF = 5.0  # seconds between commit attempts while the store is unreachable


class StreamWriter:
    """One stream's pending text: the Flusher commits it; ``finish`` and ``replace`` order after it."""

    def __init__(self, flusher: Flusher, sid: str, owner: str, *, index: int = 0, replace_first: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.sid = sid
        self.owner = owner
        self._flusher = flusher
        self._clock = clock
        self._index = index  # the chunk index the next append gets (the store checks it on retries)
        self._replace_next = replace_first  # a takeover's first write replaces what the old owner wrote
        self._pending: list[str] = []
        self.pending_bytes = 0
        self._in_flight: ChunkWrite | None = None
        self.lost = False
        self.closed = False  # finished (done, failed, or WeCom's window closed): nothing more is written
        self.first_text_at: float | None = None  # monotonic time of the first text in the store
        self.last_write = time.monotonic()  # a write refreshes the heartbeat too
        self.writes = 0

    @property
    def has_text(self) -> bool:
        """Some answer text was written or is waiting to be."""
        return self.first_text_at is not None or bool(self._pending) or self._in_flight is not None

    @property
    def pending(self) -> bool:
        """Text waits for the next commit."""
        return bool(self._pending)

    def add(self, text: str) -> None:
        """Queue a delta for the next tick; raises OwnershipLost once a write was refused."""
        if self.lost:
            raise OwnershipLost(self.sid)
        if self.closed or not text:
            return
        self._pending.append(text)
        self.pending_bytes += len(text.encode("utf-8"))
        self._flusher.mark(self)

    async def replace(self, text: str) -> None:
        """Make ``text`` the whole content (Dify's message_replace), committed with the next tick."""
        if self.lost:
            raise OwnershipLost(self.sid)
        if self.closed:
            return
        # Whatever is pending or failed in flight is superseded: wait for the tick, then drop it.
        await self._flusher.settle(self)
        self._pending = [text]
        self.pending_bytes = len(text.encode("utf-8"))
        self._replace_next = True
        self._flusher.mark(self)

    async def finish(self, status: str, tail: str, fields: Mapping[str, str], budget: float = 60.0) -> bool:
        """Write what is pending plus ``tail`` and mark the session ``status``, retried for ``budget`` s.

        False (nothing written) if the stream was already closed, e.g. by WeCom's window.
        """
        if self.closed:
            return False
        if self.lost:
            raise OwnershipLost(self.sid)
        # Closed before the first await: a delta arriving meanwhile must not follow the final write.
        self.closed = True
        await self._flusher.settle(self)
        streams = self._flusher.streams
        text = "".join(self._pending) + tail
        if self._replace_next and text:
            ok = await retrying(lambda: streams.replace(self.sid, self.owner, text, self._clock()),
                                f"stream {self.sid} replace", budget)
            self._done_write(ok, replace=True)
            text = ""
        ok = await retrying(lambda: streams.finish(self.sid, self.owner, status, text, fields, self._clock()),
                            f"stream {self.sid} finish", budget)
        self._pending.clear()
        self.pending_bytes = 0
        self._done_write(ok, replace=False, counted=bool(text) and status == DONE)
        if self.lost:
            raise OwnershipLost(self.sid)
        return True

    # -- the Flusher's side ----------------------------------------------------------------------

    def take(self) -> ChunkWrite:
        """Move the pending text into a write for this tick."""
        write = ChunkWrite(self.sid, self.owner, "".join(self._pending), self._index, self._replace_next)
        self._pending.clear()
        self.pending_bytes = 0
        self._in_flight = write
        return write

    def restore(self) -> None:
        """The tick failed: its text goes back in front of what arrived meanwhile."""
        if self._in_flight is not None:
            self._pending.insert(0, self._in_flight.text)
            self.pending_bytes += len(self._in_flight.text.encode("utf-8"))
            self._in_flight = None

    def committed(self, ok: bool) -> None:
        """The tick's write returned ``ok`` (False: another process owns the session)."""
        write, self._in_flight = self._in_flight, None
        self._done_write(ok, replace=write is not None and write.replace)

    def _done_write(self, ok: bool, replace: bool, counted: bool = True) -> None:
        if not ok:
            self.lost = True
            return
        if replace:
            self._index = 1
            self._replace_next = False
        else:
            self._index += 1
        self.writes += 1
        self.last_write = time.monotonic()
        if counted and self.first_text_at is None:
            self.first_text_at = self.last_write


class Flusher:
    """The process's group commit: every stream's pending text in one pipelined round trip per tick."""

    def __init__(self, streams: StreamStore, interval: float, max_bytes: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.streams = streams
        self._interval = interval
        self._max_bytes = max_bytes
        self._clock = clock
        self._dirty: dict[StreamWriter, None] = {}  # an ordered set
        self._in_flight: set[StreamWriter] = set()
        self._wake = asyncio.Event()
        self._tick_done = asyncio.Event()
        self._urgent = False
        self._task: asyncio.Task[None] | None = None
        self._last = 0.0
        self.ticks = 0
        self.failures = 0

    def mark(self, writer: StreamWriter) -> None:
        """``writer`` has text pending: commit it with the next tick."""
        self._dirty[writer] = None
        if writer.pending_bytes >= self._max_bytes:
            self._urgent = True
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="flusher")

    async def settle(self, writer: StreamWriter) -> None:
        """Wait until no tick holds ``writer``'s text, and take it off the next one."""
        while writer in self._in_flight:
            await self._tick_done.wait()
        self._dirty.pop(writer, None)

    async def close(self) -> None:
        """Stop the background task (answers were drained before)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        pause = self._interval
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Coalesce: at most one tick per interval, unless a stream has a full buffer waiting.
            wait = self._interval - (time.monotonic() - self._last)
            if wait > 0 and not self._urgent:
                await asyncio.sleep(wait)
            self._urgent = False
            batch = [writer for writer in self._dirty if writer.pending]
            self._dirty.clear()
            if not batch:
                continue
            writes = [writer.take() for writer in batch]
            self._in_flight = set(batch)
            self._tick_done.clear()
            try:
                results = await self.streams.commit(writes, self._clock())
            except Exception as exc:  # no failure may end the one writer of the process
                for writer in batch:
                    writer.restore()
                    self._dirty[writer] = None
                self.failures += 1
                if isinstance(exc, StoreError):
                    log.warning("store write of %d streams failed, text kept for retry in %.1f s: %s",
                                len(batch), pause, exc)
                else:
                    log.exception("store write of %d streams crashed; retrying", len(batch))
                self._release_tick()
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_BACKOFF)
                self._wake.set()
                continue
            for writer, ok in zip(batch, results, strict=True):
                writer.committed(ok)
            pause = self._interval
            self.ticks += 1
            self._last = time.monotonic()
            self._release_tick()

    def _release_tick(self) -> None:
        self._in_flight = set()
        self._tick_done.set()
