"""Retrying a store call through a transient outage: load makes an answer slower, not lost."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from laibao.errors import StoreError

log = logging.getLogger("laibao.answer")

T = TypeVar("T")

FIRST_PAUSE = 0.1  # seconds before the first retry; doubled each time up to MAX_PAUSE
MAX_PAUSE = 5.0
STEP_BUDGET = 60.0  # seconds one relay step keeps retrying (a Redis restart fits; a dead Redis does not)


async def retrying(call: Callable[[], Awaitable[T]], what: str, budget: float = STEP_BUDGET) -> T:
    """``await call()``, retried with backoff while it raises StoreError, for up to ``budget`` seconds."""
    give_up = time.monotonic() + budget
    pause = FIRST_PAUSE
    while True:
        try:
            return await call()
        except StoreError as exc:
            if time.monotonic() + pause > give_up:
                raise
            log.warning("%s: store unavailable, retrying in %.1f s: %s", what, pause, exc)
        await asyncio.sleep(pause)
        pause = min(pause * 2, MAX_PAUSE)
