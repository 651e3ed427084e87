"""Time under the tests' control: the clock injected into the in-process stores and caches.

A test of a TTL moves this clock instead of sleeping, so it cannot race a busy CPU. Redis keeps its
own time: Redis variants assert on PTTL, or wait (with a generous deadline) for an expiry to happen.
"""

from __future__ import annotations


class FakeClock:
    """Wall time (unix seconds) that only moves when a test moves it."""

    def __init__(self, now: float = 1_732_500_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass."""
        self.now += seconds
