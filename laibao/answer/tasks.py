"""The answers running on this process: their cap, background side calls, and shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class AnswerTasks:
    """Every background task of this process; answers count against ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.draining = False  # set on SIGTERM: no new answers start on this process
        self._tasks: set[asyncio.Task[None]] = set()
        self._answers: set[asyncio.Task[None]] = set()

    @property
    def answers(self) -> int:
        """Answers running now."""
        return len(self._answers)

    def has_room(self) -> bool:
        """True when another answer may start here (below the cap and not draining)."""
        return not self.draining and len(self._answers) < self.capacity

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run a side call (stop, feedback, ...) in the background, kept until it ends."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start_answer(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run an answer job; it counts against the cap until it ends."""
        task = self.spawn(coro, name)
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for running tasks; cancel the rest and return how many."""
        self.draining = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        left = set(self._tasks)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)
        return len(left)
