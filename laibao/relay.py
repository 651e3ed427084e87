"""The stream relay: accept a WeCom message, stream Dify's answer into the shared store, answer polls.

Nothing on the callback path waits for Dify: ``accept`` records the session, starts the relay task and
answers at once; the task keeps running after that HTTP request is gone. Any process can answer a
refresh poll, because the whole state lives in the stream store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from laibao import texts
from laibao.config import BotConfig, Config
from laibao.dify import DifyClient
from laibao.errors import DifyError, DifyHTTPError, StoreError
from laibao.metrics import Metrics
from laibao.sse import MessageDelta, MessageEnd, MessageReplace
from laibao.wecom import Callback, stream_reply, text_reply
from stores.base import DONE, ERROR, Stores, StreamSession, StreamStore

log = logging.getLogger("laibao.relay")

# WeCom polls a stream for at most 6 minutes from the user's message.
STREAM_WINDOW = 360.0
CONVERSATION_GONE = "Conversation Not Exists"
WELCOME = "你好，我是 AI 助手，直接发消息提问即可。"
SHOWN_CACHE_SIZE = 10000


@dataclass(frozen=True)
class RelaySettings:
    """The knobs of the relay, taken from Config once."""

    node: str
    lease: float = 15.0
    stream_ttl: float = 1800.0
    msgid_ttl: float = 3600.0
    flush_interval: float = 0.1
    flush_bytes: int = 1024
    log_content: bool = False

    @classmethod
    def from_config(cls, config: Config) -> RelaySettings:
        """Take the relay's settings from the service configuration."""
        return cls(
            node=config.node,
            lease=config.lease,
            stream_ttl=config.stream_ttl,
            msgid_ttl=config.msgid_ttl,
            flush_interval=config.flush_interval,
            flush_bytes=config.flush_bytes,
            log_content=config.log_content,
        )


class OwnershipLost(Exception):
    """Another process took the session over; this relay must stop writing."""


class RelayTasks:
    """The relay tasks running on this process, so shutdown can wait for them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False  # set on SIGTERM: no new relays start on this process

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` in the background and keep a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for running relays; cancel the rest and return how many."""
        self.draining = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        left = set(self._tasks)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)
        return len(left)


class ChunkWriter:
    """Coalesces answer deltas into few store writes: at most one per ``interval`` or per ``max_bytes``."""

    def __init__(
        self,
        streams: StreamStore,
        sid: str,
        owner: str,
        interval: float,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
        replace_first: bool = False,
    ) -> None:
        self._streams = streams
        self._sid = sid
        self._owner = owner
        self._interval = interval
        self._max_bytes = max_bytes
        self._clock = clock
        self._replace_next = replace_first
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._last_flush = time.monotonic()
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._later: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self.wrote = False  # some answer text reached the store
        self.first_text_at: float | None = None  # monotonic time of the first text in the store
        self.writes = 0

    @property
    def has_text(self) -> bool:
        """Some answer text was written or is waiting to be."""
        return self.wrote or bool(self._pending)

    async def add(self, text: str) -> None:
        """Queue an answer delta; write now if enough has piled up, else within ``interval``."""
        if self._failure is not None:
            raise self._failure
        if not text:
            return
        self._pending.append(text)
        self._pending_bytes += len(text.encode("utf-8"))
        waited = time.monotonic() - self._last_flush
        if self._pending_bytes >= self._max_bytes or waited >= self._interval:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval - waited, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None
        self._later = asyncio.get_running_loop().create_task(self._background_flush())

    async def _background_flush(self) -> None:
        try:
            await self.flush()
        except OwnershipLost as exc:
            # Raised to the relay at its next add() or finish().
            self._failure = exc

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def flush(self) -> None:
        """Write whatever is pending as one chunk; on a store outage keep it pending and retry later."""
        async with self._lock:
            self._cancel_timer()
            if not self._pending:
                return
            taken = len(self._pending)
            text = "".join(self._pending[:taken])
            try:
                await self._write(text)
            except StoreError as exc:
                # Keep the text: it goes out with the next flush once the store is back.
                self._last_flush = time.monotonic()
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(self._interval * 10, self._flush_later)
                log.warning("stream %s: store write failed, text kept for retry: %s", self._sid, exc)
                return
            # Deltas added while the write was in flight stay pending.
            del self._pending[:taken]
            self._pending_bytes = sum(len(t.encode("utf-8")) for t in self._pending)

    async def _write(self, text: str) -> None:
        if self._replace_next:
            ok = await self._streams.replace(self._sid, self._owner, text, self._clock())
            self._replace_next = False
        else:
            ok = await self._streams.append(self._sid, self._owner, text, self._clock())
        self._last_flush = time.monotonic()
        self.writes += 1
        if not ok:
            raise OwnershipLost(self._sid)
        self.wrote = True
        if self.first_text_at is None:
            self.first_text_at = time.monotonic()

    async def replace(self, text: str) -> None:
        """Make ``text`` the whole answer (Dify's message_replace)."""
        async with self._lock:
            self._cancel_timer()
            self._pending.clear()
            self._pending_bytes = 0
            self._replace_next = True
            await self._write(text)

    async def finish(
        self, status: str, tail: str, fields: Mapping[str, str], retry_for: float = 60.0
    ) -> None:
        """Write what is pending plus ``tail`` and mark the session ``status``, in one store call.

        A store outage is retried with backoff for up to ``retry_for`` seconds, so a short Redis
        restart loses no answer.
        """
        async with self._lock:
            self._cancel_timer()
            taken = len(self._pending)
            text = "".join(self._pending[:taken]) + tail
            give_up = time.monotonic() + retry_for
            pause = 0.2
            while True:
                try:
                    if self._replace_next and text:
                        await self._write(text)
                        text = ""
                    ok = await self._streams.finish(self._sid, self._owner, status, text, fields, self._clock())
                    break
                except StoreError:
                    if time.monotonic() + pause > give_up:
                        raise
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 5.0)
            del self._pending[:taken]
            self._pending_bytes = 0
            self.writes += 1
            if text and status == DONE and self.first_text_at is None:
                self.first_text_at = time.monotonic()
            if not ok:
                raise OwnershipLost(self._sid)

    async def close(self) -> None:
        """Stop the pending timer and wait for a background write in flight."""
        self._cancel_timer()
        if self._later is not None and not self._later.done():
            await asyncio.wait({self._later})


class BotService:
    """Everything one bot does with a callback: accept messages, answer refresh polls, relay Dify."""

    def __init__(
        self,
        bot: BotConfig,
        stores: Stores,
        dify: DifyClient,
        settings: RelaySettings,
        tasks: RelayTasks,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bot = bot
        self.stores = stores
        self.dify = dify
        self.settings = settings
        self.tasks = tasks
        self.metrics = metrics
        self.clock = clock
        # The last content each stream showed, so a poll during a store outage never shows less.
        self._shown: OrderedDict[str, str] = OrderedDict()

    async def on_callback(self, callback: Callback) -> dict[str, Any] | None:
        """The plaintext reply to one callback, or None for an empty HTTP 200."""
        try:
            if callback.msgtype == "stream":
                return await self.refresh(callback.stream_id)
            if callback.msgtype in ("text", "voice"):
                return await self.accept(callback)
            if callback.msgtype == "event":
                return text_reply(WELCOME) if callback.event_type == "enter_chat" else None
        except StoreError as exc:
            self.metrics.store_errors.inc()
            log.error("bot %s: store unavailable while handling %s: %s", self.bot.key, callback.msgtype, exc)
            if callback.msgtype == "stream":
                # Keep WeCom polling with what it already showed: the answer may still arrive.
                shown = self._shown.get(callback.stream_id) or self.bot.placeholder
                return stream_reply(callback.stream_id, shown, finish=False)
            return stream_reply(_new_id(), texts.BUSY, finish=True)
        # image, mixed, file, video: not relayed yet; close the stream politely.
        return stream_reply(_new_id(), texts.UNSUPPORTED, finish=True)

    async def accept(self, callback: Callback) -> dict[str, Any]:
        """Record a new message, start its relay and return the first stream reply, without waiting on Dify."""
        sid = _new_id()
        query = callback.text.strip()
        if not query:
            return stream_reply(sid, "请输入要问的内容。", finish=True)
        winner = await self.stores.dedupe.claim(self.bot.key, callback.msgid, sid, self.settings.msgid_ttl)
        if winner != sid:
            # WeCom delivered the callback again (maybe to another process): same stream, no second Dify call.
            log.info("bot %s: duplicate msgid, stream %s", self.bot.key, winner)
            return await self.refresh(winner, duplicate=True)
        now = self.clock()
        draining = self.tasks.draining
        session = StreamSession(
            sid=sid,
            bot=self.bot.key,
            user=callback.userid,
            chat=callback.chatid,
            query=query,
            scope=f"{callback.chatid}/{callback.userid}" if callback.is_group else callback.userid,
            response_url=callback.response_url,
            # A draining process records the message unowned: the first poll elsewhere takes it.
            owner="" if draining else self.settings.node,
            created=now,
            deadline=now + STREAM_WINDOW,
            heartbeat=0.0 if draining else now,
        )
        await self.stores.streams.create(session, self.settings.stream_ttl)
        if not draining:
            self.tasks.spawn(self.relay(session), name=f"relay-{sid}")
        if self.settings.log_content:
            log.info("bot %s: stream %s for %s: %s", self.bot.key, sid, callback.userid, query)
        else:
            log.info("bot %s: stream %s started for a %s chat", self.bot.key, sid, callback.chattype)
        return stream_reply(sid, self.bot.placeholder, finish=False, feedback_id=sid)

    async def refresh(self, sid: str, duplicate: bool = False) -> dict[str, Any]:
        """Answer a refresh poll with the cumulative snapshot; finish once the final content is in it."""
        snapshot = await self.stores.streams.poll(sid)
        if snapshot is None:
            if duplicate:
                # The first delivery is being set up on another process right now.
                return stream_reply(sid, self.bot.placeholder, finish=False)
            return stream_reply(sid, texts.EXPIRED, finish=True)
        if not snapshot.finished and not self.tasks.draining and self._orphaned(snapshot.owner, snapshot.heartbeat):
            await self._take_over(sid, snapshot.owner)
        content = snapshot.content or self.bot.placeholder
        self._remember(sid, content, snapshot.finished)
        return stream_reply(sid, content, finish=snapshot.finished)

    def _remember(self, sid: str, content: str, finished: bool) -> None:
        if finished:
            self._shown.pop(sid, None)
            return
        self._shown[sid] = content
        self._shown.move_to_end(sid)
        while len(self._shown) > SHOWN_CACHE_SIZE:
            self._shown.popitem(last=False)

    def _orphaned(self, owner: str, heartbeat: float) -> bool:
        return owner == "" or self.clock() - heartbeat > self.settings.lease

    async def _take_over(self, sid: str, previous_owner: str) -> None:
        """Adopt a session whose relay died (stale heartbeat) or was released; one process wins."""
        if not await self.stores.streams.take_over(sid, self.settings.node, self.clock(), self.settings.lease):
            return
        session = await self.stores.streams.get(sid)
        if session is None:
            return
        self.metrics.takeovers.labels(self.bot.key).inc()
        log.warning("bot %s: took over stream %s from %s", self.bot.key, sid, previous_owner or "(released)")
        self.tasks.spawn(self.relay(session, takeover=True), name=f"relay-{sid}")

    def dify_user(self, session: StreamSession) -> str:
        """The Dify ``user`` for a session: conversations are scoped by it."""
        return f"wecom:{session.user}"

    async def relay(self, session: StreamSession, takeover: bool = False) -> None:
        """Stream Dify's answer for ``session`` into the store until it is done or failed."""
        writer = ChunkWriter(
            self.stores.streams,
            session.sid,
            self.settings.node,
            self.settings.flush_interval,
            self.settings.flush_bytes,
            self.clock,
            replace_first=takeover,
        )
        beat = asyncio.get_running_loop().create_task(self._keep_alive(session.sid))
        started = time.monotonic()
        self.metrics.active.inc()
        try:
            end = await self._ask_dify(session, writer)
            fields = {"conversation_id": end.conversation_id, "message_id": end.message_id,
                      "task_id": end.task_id}
            await writer.finish(DONE, "", fields)
            if end.conversation_id:
                await self.stores.conversations.set(
                    self.bot.key, session.scope, end.conversation_id, self.bot.conversation_ttl
                )
            self.metrics.answer.observe(time.monotonic() - started)
            log.info("stream %s done in %.2f s (%d writes)", session.sid, time.monotonic() - started,
                     writer.writes)
        except OwnershipLost:
            log.warning("stream %s: another process owns it now; this relay stops", session.sid)
        except DifyError as exc:
            self.metrics.dify_errors.labels(self.bot.key, _error_code(exc)).inc()
            log.warning("stream %s: Dify failed: %s", session.sid, exc)
            await self._fail(writer, session, texts.explain(exc))
        except StoreError as exc:
            self.metrics.store_errors.inc()
            log.error("stream %s: store failed; another process takes it over after the lease: %s",
                      session.sid, exc)
        except asyncio.CancelledError:
            # Shutdown after the grace period: hand the session over at once instead of after the lease.
            await asyncio.shield(self._release(session.sid))
            raise
        except Exception:
            log.exception("stream %s: relay crashed", session.sid)
            await self._fail(writer, session, texts.GENERIC_ERROR)
        finally:
            self.metrics.active.dec()
            if writer.first_text_at is not None:
                self.metrics.first_content.observe(writer.first_text_at - started)
            beat.cancel()
            await writer.close()

    async def _release(self, sid: str) -> None:
        try:
            if await self.stores.streams.release(sid, self.settings.node):
                log.warning("stream %s released for another process to finish", sid)
        except StoreError as exc:
            log.error("stream %s: could not release (taken over after the lease): %s", sid, exc)

    async def _fail(self, writer: ChunkWriter, session: StreamSession, message: str) -> None:
        """End the stream with a short explanation after whatever was already shown."""
        tail = ("\n\n" + message) if writer.has_text else message
        try:
            await writer.finish(ERROR, tail, {})
        except (StoreError, OwnershipLost) as exc:
            log.error("stream %s: could not record the failure: %s", session.sid, exc)

    async def _ask_dify(self, session: StreamSession, writer: ChunkWriter) -> MessageEnd:
        """Run the Dify call, retrying once with a new conversation when Dify forgot the stored one."""
        conversation_id = await self.stores.conversations.get(self.bot.key, session.scope) or ""
        while True:
            try:
                return await self._stream(session, conversation_id, writer)
            except DifyHTTPError as exc:
                if not (conversation_id and exc.status == 404 and exc.message.startswith(CONVERSATION_GONE)):
                    raise
                log.info("stream %s: Dify lost conversation; starting a new one", session.sid)
                await self.stores.conversations.delete(self.bot.key, session.scope)
                conversation_id = ""

    async def _stream(self, session: StreamSession, conversation_id: str, writer: ChunkWriter) -> MessageEnd:
        events = self.dify.chat_stream(
            query=session.query, user=self.dify_user(session), conversation_id=conversation_id
        )
        # aclosing: returning at message_end must still close the HTTP stream at once.
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, MessageDelta):
                    await writer.add(event.answer)
                elif isinstance(event, MessageReplace):
                    await writer.replace(event.answer)
                elif isinstance(event, MessageEnd):
                    return event
        raise DifyError("Dify stream ended without message_end")  # the client raises first; kept for safety

    async def _keep_alive(self, sid: str) -> None:
        """Refresh the session's heartbeat while the relay runs, so no other process takes it over."""
        period = self.settings.lease / 3
        while True:
            await asyncio.sleep(period)
            try:
                if not await self.stores.streams.heartbeat(sid, self.settings.node, self.clock()):
                    return
            except StoreError as exc:
                log.warning("stream %s: heartbeat failed: %s", sid, exc)


def _error_code(exc: DifyError) -> str:
    """A bounded label for the Dify error metric."""
    code = getattr(exc, "code", "") or ""
    if code:
        return str(code)[:40]
    return type(exc).__name__


def _new_id() -> str:
    return uuid.uuid4().hex
