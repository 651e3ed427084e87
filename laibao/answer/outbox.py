"""response_url deliveries any process can finish: claimed once, delivered once, swept after a crash."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from laibao import texts
from laibao.delivery import post_markdown
from laibao.errors import StoreError
from laibao.outbound import Outbound
from stores.base import StreamStore
from stores.relay_store import RelayState

log = logging.getLogger("laibao.answer")


class Outbox:
    """Delivers the outbox of a session: by its own relay at once, or by any process's sweep later."""

    def __init__(self, relay: RelayState, streams: StreamStore, http: Outbound, *, node: str, lease: float,
                 retries: int, clock: Callable[[], float] = time.time) -> None:
        self.relay = relay
        self.streams = streams
        self.http = http
        self.node = node
        self.lease = lease
        self.retries = retries
        self.clock = clock
        self.delivered = 0

    async def deliver(self, sid: str, response_url: str | None = None) -> bool:
        """Claim and post the session's outbox; False if there is none or another process has it."""
        content = await self.relay.claim(sid, self.node, self.clock(), self.lease, texts.INTERRUPTED)
        if content is None:
            return False
        if response_url is None:
            session = await self.streams.get(sid)
            response_url = session.response_url if session is not None else ""
        ok = bool(response_url) and bool(content.strip())
        if ok:
            ok = await post_markdown(self.http, response_url, content, retries=self.retries)
        await self.relay.delivered(sid, ok)
        self.delivered += ok
        log.log(logging.INFO if ok else logging.ERROR, "stream %s: response_url delivery %s", sid,
                "done" if ok else "failed")
        return ok

    async def sweep(self) -> None:
        """Deliver what relays that died (or were slow to) left behind."""
        for sid in await self.relay.pending(self.clock()):
            try:
                await self.deliver(sid)
            except StoreError as exc:
                log.warning("stream %s: delivery sweep failed: %s", sid, exc)
                return

    async def run(self, every: float) -> None:
        """Sweep every ``every`` seconds until cancelled."""
        while True:
            await asyncio.sleep(every)
            try:
                await self.sweep()
            except StoreError as exc:
                log.warning("delivery sweep failed: %s", exc)
            except Exception:  # the sweep must outlive any one bad session
                log.exception("delivery sweep crashed")
