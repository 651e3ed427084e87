"""A process-wide bound on the bytes of media held in memory at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ByteBudget:
    """At most ``limit`` bytes reserved at once; a reservation waits for room.

    A reservation larger than the whole budget still runs, alone, so one big file is never refused
    by this bound (its own size limit does that).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be positive, not {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._room = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        """Reserve ``size`` bytes for the block (waiting for room), release them after."""
        async with self._room:
            await self._room.wait_for(lambda: self.used == 0 or self.used + size <= self.limit)
            self.used += size
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            async with self._room:
                self.used -= size
                self._room.notify_all()
