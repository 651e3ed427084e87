"""The connection holder pushes every live stream of its bot: cumulative frames, then a non-empty finish.

A stream's content comes from the same ``BotService.refresh`` a callback-mode poll uses (rendering,
the 20480-byte cut, images on the finish, taking over an orphaned answer), so both modes show the
same thing. The streams to push are registered in the ``WsStore``, so a new holder finds them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from laibao import texts
from laibao.config import Config
from laibao.errors import FrameRefused, LongConnectionError, StoreError
from laibao.service import BotService
from laibao.wecom import cap_utf8
from stores.ws_store import LiveStream, WsStore

if TYPE_CHECKING:
    from laibao.longconn import Connection

log = logging.getLogger("laibao.push")

REFUSED_REQ_ID = frozenset({846608, 846605})  # stream expired / invalid req_id: only aibot_send_msg is left
MAX_FAILURES = 3  # other refusals of one stream's frames in a row before its answer goes by aibot_send_msg
SCAN_EVERY = 1.0  # seconds between looks for streams registered by another process or an earlier holder


async def send_markdown(conn: Connection, chatid: str, markdown: str) -> tuple[int, str]:
    """aibot_send_msg of one markdown message; (WeCom's errcode, errmsg), -1 when the connection failed."""
    body = {"chatid": chatid, "msgtype": "markdown", "markdown": {"content": cap_utf8(markdown)}}
    try:
        await conn.request("aibot_send_msg", body)
    except FrameRefused as exc:
        return exc.errcode, str(exc)
    except LongConnectionError as exc:
        return -1, str(exc)
    return 0, "ok"


class Pusher:
    """The pushing side of one subscribed connection."""

    def __init__(self, conn: Connection, service: BotService, store: WsStore, config: Config,
                 frames: Counter) -> None:
        self._conn = conn
        self._service = service
        self._store = store
        self._bot = service.bot.key
        self._interval = config.ws_push_interval
        self._stream_ttl = config.stream_ttl
        self._frames = frames
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._done: set[str] = set()
        self._newer: dict[str, LiveStream] = {}  # a repeated message's req_id, for its stream's next frame

    def track(self, live: LiveStream) -> None:
        """Start pushing a stream now (its placeholder goes out at once)."""
        if live.sid in self._tasks or live.sid in self._done:
            return
        task = asyncio.get_running_loop().create_task(self._push(live), name=f"ws-stream-{live.sid}")
        self._tasks[live.sid] = task
        task.add_done_callback(lambda _: self._forget(live.sid))

    def retarget(self, live: LiveStream) -> None:
        """WeCom delivered the message again on a new req_id: the stream's frames go on that one from now on.

        The whole text so far goes out on it at once (frames are cumulative), with the feedback id.
        """
        if live.sid in self._tasks:
            self._newer[live.sid] = live
        else:
            self.track(live)

    async def run(self) -> None:
        """Pick up every registered stream: after a failover they were registered by the previous holder."""
        while True:
            try:
                for live in await self._store.live(self._bot):
                    self.track(live)
            except StoreError as exc:
                log.warning("bot %s: cannot read the live streams: %s", self._bot, exc)
            await asyncio.sleep(SCAN_EVERY)

    async def stop(self) -> None:
        """Stop pushing (the connection is going away; the next holder resumes from the store)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def finish_now(self, live: LiveStream, stream: Mapping[str, Any]) -> None:
        """Answer a message at once with a finished stream (command, refusal, a repeat of a finished one)."""
        try:
            await self._conn.request("aibot_respond_msg", {"msgtype": "stream", "stream": dict(stream)},
                                     req_id=live.req_id)
        except FrameRefused as exc:
            if exc.errcode in REFUSED_REQ_ID:
                await self._fallback(live, str(stream.get("content") or ""))
            else:
                log.warning("bot %s: reply refused: %s", self._bot, exc)
        except LongConnectionError as exc:
            log.warning("bot %s: reply not sent: %s", self._bot, exc)

    async def _push(self, live: LiveStream) -> None:
        last: str | None = None
        failures = 0
        fallback = False
        while True:
            newer = self._newer.pop(live.sid, None)
            if newer is not None and newer.req_id != live.req_id:
                live, last, failures, fallback = newer, None, 0, False
            try:
                reply = await self._service.refresh(live.sid)
            except StoreError as exc:
                log.warning("stream %s: cannot read it to push: %s", live.sid, exc)
                await asyncio.sleep(self._interval)
                continue
            stream = reply["stream"]
            finish = bool(stream["finish"])
            content = str(stream["content"])
            if finish and not content.strip():
                # An empty or blank finishing frame would erase what was shown, or fail to replace it.
                content = texts.NO_ANSWER
            if fallback:
                if finish:
                    if await self._fallback(live, content):
                        await self._drop(live)
                    # Otherwise the connection is gone: the stream stays registered for the next holder.
                    return
            elif finish or (content != last and content.strip()):
                body: dict[str, Any] = {"id": live.sid, "finish": finish, "content": content}
                if not live.feedback_sent:
                    body["feedback"] = {"id": live.sid}
                if finish and stream.get("msg_item"):
                    body["msg_item"] = stream["msg_item"]
                try:
                    await self._conn.request("aibot_respond_msg", {"msgtype": "stream", "stream": body},
                                             req_id=live.req_id)
                except FrameRefused as exc:
                    failures += 1
                    if exc.errcode in REFUSED_REQ_ID or failures >= MAX_FAILURES:
                        log.warning("stream %s: WeCom refused its frames (%s); the answer goes by aibot_send_msg",
                                    live.sid, exc)
                        fallback = True
                        continue
                    log.warning("stream %s: frame refused, retried: %s", live.sid, exc)
                except LongConnectionError as exc:
                    log.info("stream %s: pushing stops with the connection: %s", live.sid, exc)
                    return
                else:
                    failures = 0
                    last = content
                    if not live.feedback_sent:
                        live = dataclasses.replace(live, feedback_sent=True)
                        with contextlib.suppress(StoreError):
                            await self._store.update_live(live, self._bot)
                    if finish:
                        await self._drop(live)
                        return
            if time.time() > live.at + self._stream_ttl:
                log.warning("stream %s: still unfinished after the stream TTL; no longer pushed", live.sid)
                await self._drop(live)
                return
            await asyncio.sleep(self._interval)

    async def _fallback(self, live: LiveStream, content: str) -> bool:
        """The final answer as a markdown message to the user (single chat) or the group: never silently lost.

        False when the connection failed (the next holder tries again); WeCom's refusal is final and logged.
        """
        errcode, errmsg = await send_markdown(self._conn, live.chat or live.user, content)
        if errcode == -1:
            return False
        if errcode:
            log.error("stream %s: the final answer could not be sent either: %s", live.sid, errmsg)
        else:
            log.info("stream %s: the final answer went out with aibot_send_msg", live.sid)
        return True

    def _forget(self, sid: str) -> None:
        self._tasks.pop(sid, None)
        self._newer.pop(sid, None)

    async def _drop(self, live: LiveStream) -> None:
        self._done.add(live.sid)
        try:
            await self._store.drop_live(self._bot, live.sid)
        except StoreError as exc:
            log.warning("stream %s: still registered for pushing (the next look drops it): %s", live.sid, exc)
