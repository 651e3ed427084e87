"""Long-connection mode: one process of the cluster holds each bot's WebSocket to WeCom.

A Redis lease per bot (``stores.ws_store``) decides which process connects; the holder subscribes,
pings, reads frames without ever waiting on an ack inside the read loop, hands messages to the same
``BotService`` as callbacks, and pushes every live stream (``laibao.push``). A process that loses the
lease closes its connection before the lease can pass on; a holder displaced by a client outside the
cluster stands the whole cluster down for a long backoff instead of fighting for the bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import tornado.websocket
from prometheus_client import CollectorRegistry, Counter, Gauge
from tornado.httpclient import HTTPClientError, HTTPRequest

from laibao.config import BotConfig, Config
from laibao.crypto import WeComCrypto, generate_aes_key
from laibao.errors import (
    CallbackError,
    FrameRefused,
    LaibaoError,
    LongConnectionError,
    NoHolder,
    StoreError,
)
from laibao.push import Pusher, send_markdown
from laibao.service import BotService
from laibao.wecom import cap_utf8, parse_callback
from stores.base import StreamSession
from stores.ws_store import LiveStream, WsStore

log = logging.getLogger("laibao.longconn")

ACK_TIMEOUT = 5.0  # WeCom acks within this; the official SDK waits as long
CONNECT_TIMEOUT = 10.0
ACQUIRE_POLL = 1.0  # seconds between tries for a lease another process holds
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0
SEND_WAIT = 5.0  # /api/send: how long a request may wait for some process to take it
DISPLACED = "disconnected_event"
MAX_FRAME_BYTES = 4 << 20


def unused_crypto() -> WeComCrypto:
    """A cipher for a websocket bot's callback slot: it has no callbacks, and its media carry their own keys."""
    return WeComCrypto("unused", generate_aes_key())


class WsMetrics:
    """The long connection's metrics, in the process's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge("laibao_ws_connected", "1 while this process holds the bot's WeCom connection",
                               ["bot"], registry=registry)
        self.reconnects = Counter("laibao_ws_reconnects", "Connections opened to WeCom after the first",
                                  ["bot"], registry=registry)
        self.displaced = Counter("laibao_ws_displaced", "Times a client outside this cluster took the connection",
                                 ["bot"], registry=registry)
        self.frames = Counter("laibao_ws_frames", "Frames sent to WeCom by command and the errcode of their ack",
                              ["bot", "cmd", "errcode"], registry=registry)


class Connection:
    """One subscribed WebSocket: requests are matched to acks by req_id; frames of one req_id go one at a time."""

    def __init__(self, ws: tornado.websocket.WebSocketClientConnection, bot: str, metrics: WsMetrics,
                 on_callback: Callable[[str, str, Mapping[str, Any]], None]) -> None:
        self._ws = ws
        self._bot = bot
        self._metrics = metrics
        self._on_callback = on_callback
        self._acks: dict[str, asyncio.Future[Mapping[str, Any]]] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # per req_id: its lock and how many wait on it
        self.closed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read(), name=f"ws-read-{bot}")

    @classmethod
    async def open(cls, url: str, bot: str, metrics: WsMetrics,
                   on_callback: Callable[[str, str, Mapping[str, Any]], None]) -> Connection:
        """Connect (no subscribe yet); LongConnectionError when WeCom cannot be reached."""
        request = HTTPRequest(url, connect_timeout=CONNECT_TIMEOUT, request_timeout=CONNECT_TIMEOUT)
        try:
            ws = await tornado.websocket.websocket_connect(request, max_message_size=MAX_FRAME_BYTES)
        except (OSError, HTTPClientError, tornado.websocket.WebSocketError) as exc:
            raise LongConnectionError(f"cannot connect to {request.url.split('?')[0]}: "
                                      f"{type(exc).__name__} {str(exc)[:120]}") from exc
        return cls(ws, bot, metrics, on_callback)

    async def _read(self) -> None:
        """Read every frame; acks resolve their request, callbacks are handed on without waiting."""
        try:
            while True:
                message = await self._ws.read_message()
                if message is None:
                    return
                try:
                    frame = json.loads(message)
                except ValueError:
                    log.warning("bot %s: a frame that is not JSON ignored", self._bot)
                    continue
                if not isinstance(frame, dict):
                    continue
                headers = frame.get("headers")
                req_id = headers.get("req_id") if isinstance(headers, Mapping) else None
                if not isinstance(req_id, str):
                    continue
                cmd = frame.get("cmd")
                if not cmd:
                    future = self._acks.pop(req_id, None)
                    if future is not None and not future.done():
                        future.set_result(frame)
                    continue
                body = frame.get("body")
                self._on_callback(str(cmd), req_id, body if isinstance(body, Mapping) else {})
        finally:
            self.closed.set()
            for future in self._acks.values():
                if not future.done():
                    future.set_exception(LongConnectionError("the connection closed before the ack"))
            self._acks.clear()

    async def request(self, cmd: str, body: Mapping[str, Any] | None = None, req_id: str | None = None,
                      timeout: float = ACK_TIMEOUT) -> Mapping[str, Any]:  # noqa: ASYNC109 - the ack deadline
        """Send one frame and return its ack; FrameRefused on a non-zero errcode, LongConnectionError otherwise."""
        req_id = req_id or uuid.uuid4().hex
        lock, users = self._locks.get(req_id) or (asyncio.Lock(), 0)
        self._locks[req_id] = (lock, users + 1)
        try:
            async with lock:  # frames of one req_id: one at a time, each after the previous ack
                return await self._send(cmd, body, req_id, timeout)
        finally:
            lock, users = self._locks[req_id]
            if users > 1:
                self._locks[req_id] = (lock, users - 1)
            else:
                del self._locks[req_id]

    async def _send(self, cmd: str, body: Mapping[str, Any] | None, req_id: str,
                    timeout: float) -> Mapping[str, Any]:  # noqa: ASYNC109
        if self.closed.is_set():
            raise LongConnectionError("the connection is closed")
        frame: dict[str, Any] = {"cmd": cmd, "headers": {"req_id": req_id}}
        if body is not None:
            frame["body"] = body
        future: asyncio.Future[Mapping[str, Any]] = asyncio.get_running_loop().create_future()
        self._acks[req_id] = future
        try:
            await self._ws.write_message(json.dumps(frame, ensure_ascii=False))
            ack = await asyncio.wait_for(future, timeout)
        except tornado.websocket.WebSocketClosedError as exc:
            raise LongConnectionError("the connection closed while sending") from exc
        except TimeoutError as exc:
            self._metrics.frames.labels(self._bot, cmd, "timeout").inc()
            raise LongConnectionError(f"no ack for {cmd} within {timeout:g} s") from exc
        finally:
            self._acks.pop(req_id, None)
        errcode = ack.get("errcode", 0)
        errcode = errcode if isinstance(errcode, int) else -1
        self._metrics.frames.labels(self._bot, cmd, str(errcode)).inc()
        if errcode != 0:
            raise FrameRefused(cmd, errcode, str(ack.get("errmsg") or ""))
        return ack

    async def close(self) -> None:
        """Close and wait (briefly) until the peer saw it, so a successor never overlaps with us."""
        self._ws.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closed.wait(), 2.0)
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


class Holder:
    """One websocket bot on this process: waits for the lease, holds the connection while it has it."""

    def __init__(self, bot: BotConfig, service: BotService, store: WsStore, config: Config,
                 metrics: WsMetrics) -> None:
        self.bot = bot
        self.service = service
        self.store = store
        self.config = config
        self.metrics = metrics
        self.key = bot.key
        self.node = config.node
        self.connection: Connection | None = None
        self._pusher: Pusher | None = None
        self.token = 0
        self._lease_ok_until = 0.0  # monotonic: past this the lease may have passed on
        self._lost = asyncio.Event()  # the lease is (maybe) no longer ours
        self._displaced = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections = 0

    # --- lifecycle ---

    def start(self) -> None:
        """Begin competing for the bot's connection."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"ws-holder-{self.key}")

    async def stop(self) -> None:
        """Close the connection and release the lease at once, so another process connects without waiting."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._tasks:
            # Messages being taken in finish their store writes (short); their answers are pushed by the next holder.
            await asyncio.wait(set(self._tasks), timeout=5.0)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless stopping; True when stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def _run(self) -> None:
        # A free lease (released on SIGTERM) is noticed within a second; an expired one within its TTL + 1 s.
        period = min(self.config.ws_lease / 3, ACQUIRE_POLL)
        while not self._stopping.is_set():
            asked = time.monotonic()  # Redis starts the lease's TTL after this
            try:
                left = await self.store.standing_down(self.key)
                token = 0 if left else await self.store.acquire(self.key, self.node, self.config.ws_lease)
            except StoreError as exc:
                log.warning("bot %s: cannot reach the lease: %s", self.key, exc)
                left, token = 0.0, 0
            if not token:
                if await self._pause(min(left, period) if left else period):
                    return
                continue
            self.token = token
            self._lease_ok_until = asked + self.config.ws_lease * 2 / 3
            self._lost.clear()
            log.info("bot %s: this process holds the WeCom connection lease (token %d)", self.key, token)
            keeper = self._spawn(self._keep_lease(token), f"ws-lease-{self.key}")
            try:
                await self._hold()
            finally:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
                await self._release(token)

    async def _release(self, token: int) -> None:
        try:
            await self.store.release(self.key, self.node, token)
        except StoreError as exc:
            log.warning("bot %s: could not release the lease (it expires by itself): %s", self.key, exc)

    async def _keep_lease(self, token: int) -> None:
        """Renew the lease three times per period; declare it lost before it can expire anywhere."""
        period = self.config.ws_lease / 3
        while True:
            started = time.monotonic()
            try:
                renewed = await asyncio.wait_for(
                    self.store.renew(self.key, self.node, token, self.config.ws_lease), period)
            except (StoreError, TimeoutError) as exc:
                log.warning("bot %s: lease renewal failed: %s", self.key, exc)
                renewed = None
            if renewed is False:
                log.error("bot %s: the lease passed to another process; closing the connection", self.key)
                self._lost.set()
                return
            if renewed:
                # Counted from before the call: Redis may have set the expiry at any point after it.
                self._lease_ok_until = started + self.config.ws_lease * 2 / 3
            wait = max(0.0, min(started + period, self._lease_ok_until) - time.monotonic())
            await asyncio.sleep(wait)
            if time.monotonic() >= self._lease_ok_until:
                log.error("bot %s: the lease could not be renewed in time; closing the connection", self.key)
                self._lost.set()
                return

    async def _hold(self) -> None:
        """Connect, subscribe and serve while the lease is ours; reconnect with backoff after a dead socket."""
        backoff = BACKOFF_FIRST
        while not self._stopping.is_set() and not self._lost.is_set():
            outcome = await self._connect_and_serve()
            if outcome in ("stopping", "lost"):
                return
            if outcome in ("displaced", "refused"):
                await self._stand_down()
                return
            if outcome == "served":
                backoff = BACKOFF_FIRST
            log.info("bot %s: reconnecting in %.0f s", self.key, backoff)
            if await self._pause_or_lost(backoff):
                return
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _pause_or_lost(self, seconds: float) -> bool:
        stop = asyncio.ensure_future(self._stopping.wait())
        lost = asyncio.ensure_future(self._lost.wait())
        done, pending = await asyncio.wait({stop, lost}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return bool(done)

    async def _stand_down(self) -> None:
        """Keep the whole cluster from connecting for the displaced backoff: never fight for the bot."""
        seconds = self.config.ws_displaced_backoff
        try:
            await self.store.stand_down(self.key, seconds)
        except StoreError as exc:
            log.warning("bot %s: could not record the stand-down in Redis: %s", self.key, exc)
        # This process waits too, even when Redis could not record it.
        await self._pause(seconds)

    async def _connect_and_serve(self) -> str:
        """One connection's life; how it ended: stopping, lost, displaced, refused, served or failed."""
        try:
            conn = await Connection.open(self.bot.ws_url, self.key, self.metrics, self._on_callback)
        except LongConnectionError as exc:
            log.warning("bot %s: %s", self.key, exc)
            return "failed"
        self._connections += 1
        if self._connections > 1:
            self.metrics.reconnects.labels(self.key).inc()
        if self._lost.is_set() or self._stopping.is_set():
            await conn.close()
            return "stopping"
        self._displaced.clear()
        try:
            await conn.request("aibot_subscribe", {"bot_id": self.bot.bot_id, "secret": self.bot.secret})
        except FrameRefused as exc:
            log.error("bot %s: WeCom refused the subscribe (errcode %d): check the bot id and secret; "
                      "not retrying for %.0f s", self.key, exc.errcode, self.config.ws_displaced_backoff)
            await conn.close()
            return "refused"
        except LongConnectionError as exc:
            log.warning("bot %s: subscribe failed: %s", self.key, exc)
            await conn.close()
            return "failed"
        pusher = Pusher(conn, self.service, self.store, self.config, self.metrics.frames)
        self.connection, self._pusher = conn, pusher
        subscribed_at = time.monotonic()
        self.metrics.connected.labels(self.key).set(1)
        log.info("bot %s: subscribed to WeCom as %s", self.key, self.node)
        workers = [self._spawn(self._ping(conn), f"ws-ping-{self.key}"),
                   self._spawn(pusher.run(), f"ws-push-{self.key}"),
                   self._spawn(self._serve_sends(conn), f"ws-send-{self.key}")]
        waits = {asyncio.ensure_future(e.wait()): name for e, name in
                 ((self._stopping, "stopping"), (self._lost, "lost"), (self._displaced, "displaced"),
                  (conn.closed, "closed"))}
        try:
            done, _ = await asyncio.wait(set(waits), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
            self.connection, self._pusher = None, None
            self.metrics.connected.labels(self.key).set(0)
            for worker in workers:
                worker.cancel()
            await pusher.stop()
            await asyncio.gather(*workers, return_exceptions=True)
            await conn.close()
        ended = {waits[w] for w in done}
        for outcome in ("stopping", "lost", "displaced"):
            if outcome in ended:
                if outcome == "displaced":
                    self.metrics.displaced.labels(self.key).inc()
                    log.error("bot %s: another client outside this cluster took the WeCom connection; "
                              "the cluster stands down for %.0f s", self.key, self.config.ws_displaced_backoff)
                return outcome
        lived = time.monotonic() - subscribed_at
        log.warning("bot %s: the WeCom connection closed after %.0f s", self.key, lived)
        # Only a connection that lived a while resets the backoff: one closed at once must not loop.
        return "served" if lived >= BACKOFF_MAX else "failed"

    async def _ping(self, conn: Connection) -> None:
        """A ping every interval; two missed acks in a row mean the socket is dead."""
        interval = self.config.ws_ping_interval
        missed = 0
        while True:
            await asyncio.sleep(interval)
            try:
                await conn.request("ping", timeout=min(interval, 10.0))
                missed = 0
            except LaibaoError as exc:
                missed += 1
                log.warning("bot %s: ping %d missed: %s", self.key, missed, exc)
                if missed >= 2:
                    log.error("bot %s: two pings unanswered; the connection is dead", self.key)
                    await conn.close()
                    return

    # --- incoming frames (called by the reader: must not wait) ---

    def _on_callback(self, cmd: str, req_id: str, body: Mapping[str, Any]) -> None:
        if cmd == "aibot_msg_callback":
            self._spawn(self._guarded(self._message(req_id, body)), f"ws-msg-{req_id}")
        elif cmd == "aibot_event_callback":
            event = body.get("event")
            kind = event.get("eventtype") if isinstance(event, Mapping) else None
            if kind == DISPLACED:
                self._displaced.set()
            else:
                self._spawn(self._guarded(self._event(req_id, body)), f"ws-event-{req_id}")
        else:
            log.info("bot %s: frame %r ignored", self.key, str(cmd)[:40])

    async def _guarded(self, handling: Coroutine[Any, Any, None]) -> None:
        """Run one frame's handling; a bug in it is logged, never left to kill the holder quietly."""
        try:
            await handling
        except Exception:
            log.exception("bot %s: handling a frame failed", self.key)

    async def _message(self, req_id: str, body: Mapping[str, Any]) -> None:
        """The same steps as a message callback; the reply goes out as stream frames on the message's req_id."""
        try:
            callback = parse_callback(body)
        except CallbackError as exc:
            log.warning("bot %s: unusable message frame: %s", self.key, exc)
            return
        if callback.msgtype in ("stream", "event"):
            return
        reply = await self.service.on_callback(callback)
        stream = reply.get("stream") if reply else None
        if not isinstance(stream, dict):
            return
        pusher = self._pusher
        live = LiveStream(str(stream["id"]), req_id, callback.userid, callback.chatid, time.time())
        if stream.get("finish"):
            # Answered at once (a command, a refusal, a repeat of a finished message).
            if pusher is not None:
                await pusher.finish_now(live, stream)
            return
        try:
            added = await self.store.add_live(live, self.key, self.config.stream_ttl)
            if not added:
                # The same msgid again on a new req_id: the latest delivery is the one WeCom waits on,
                # so the stream's frames move to it (here and for whichever process holds the bot next).
                await self.store.update_live(live, self.key)
        except StoreError as exc:
            log.error("bot %s: stream %s not registered for pushing: %s", self.key, live.sid, exc)
            added = True
        if pusher is None:
            return
        if added:
            pusher.track(live)
        else:
            pusher.retarget(live)

    async def _event(self, req_id: str, body: Mapping[str, Any]) -> None:
        """enter_chat gets a welcome; feedback reaches Dify; a template card event is taken note of."""
        try:
            callback = parse_callback(body)
        except CallbackError as exc:
            log.warning("bot %s: unusable event frame: %s", self.key, exc)
            return
        conn = self.connection
        if callback.event_type == "enter_chat" and conn is not None:
            welcome = await self.service.welcome()
            try:
                await conn.request("aibot_respond_welcome_msg",
                                   {"msgtype": "text", "text": {"content": cap_utf8(welcome)}}, req_id=req_id)
            except LongConnectionError as exc:
                log.warning("bot %s: welcome not shown: %s", self.key, exc)
        elif callback.event_type == "feedback_event":
            await self.service.on_event(callback)
        else:
            log.info("bot %s: event %s noted", self.key, callback.event_type[:40] or "?")

    # --- sending on behalf of any process ---

    async def _serve_sends(self, conn: Connection) -> None:
        """Take /api/send and overflow requests queued by any process and send them on this connection."""
        while not conn.closed.is_set():
            try:
                raw = await self.store.take_send(self.key, 1.0)
            except StoreError as exc:
                log.warning("bot %s: cannot read send requests: %s", self.key, exc)
                await asyncio.sleep(1.0)
                continue
            if raw is None:
                continue
            try:
                request = json.loads(raw)
                rid, chatid, markdown = str(request["id"]), str(request["chatid"]), str(request["markdown"])
            except (ValueError, KeyError, TypeError):
                log.warning("bot %s: malformed send request dropped", self.key)
                continue
            errcode, errmsg = await send_markdown(conn, chatid, markdown)
            try:
                await self.store.answer_send(rid, json.dumps({"errcode": errcode, "errmsg": errmsg}))
            except StoreError as exc:
                log.warning("bot %s: send answered %d but the answer was not stored: %s", self.key, errcode, exc)


class LongConnections:
    """Every websocket bot of this process: their holders, and sending through whichever process holds one."""

    def __init__(self, config: Config, services: Mapping[str, BotService], store: WsStore,
                 registry: CollectorRegistry) -> None:
        self.config = config
        self.store = store
        self.metrics = WsMetrics(registry)
        self.holders = {bot.key: Holder(bot, services[bot.name], store, config, self.metrics)
                        for bot in config.bots if bot.websocket}
        for bot in config.bots:
            if bot.websocket:
                services[bot.name].answers.send_markdown = self._deliver

    def start(self) -> None:
        """Compete for every websocket bot's connection."""
        for holder in self.holders.values():
            holder.start()

    async def stop(self) -> None:
        """Close every connection and release the leases."""
        await asyncio.gather(*(holder.stop() for holder in self.holders.values()))

    async def send(self, bot: str, chatid: str, markdown: str) -> tuple[int, str]:
        """Send a markdown message through the bot's connection wherever it is held; NoHolder when none is."""
        holder = self.holders[bot]
        conn = holder.connection
        if conn is not None:
            return await send_markdown(conn, chatid, markdown)
        rid = uuid.uuid4().hex
        request = json.dumps({"id": rid, "chatid": chatid, "markdown": markdown}, ensure_ascii=False)
        await self.store.post_send(bot, request)
        answer = await self.store.send_answer(rid, SEND_WAIT)
        if answer is None:
            if await self.store.withdraw_send(bot, request):
                raise NoHolder(f"bot {bot}: no process holds the WeCom connection")
            # Taken by the holder: its ack comes within the ack timeout.
            answer = await self.store.send_answer(rid, ACK_TIMEOUT * 2)
            if answer is None:
                raise NoHolder(f"bot {bot}: the holder did not answer")
        try:
            result = json.loads(answer)
            return int(result["errcode"]), str(result.get("errmsg") or "")
        except (ValueError, KeyError, TypeError) as exc:
            raise LongConnectionError(f"bot {bot}: unreadable send answer") from exc

    async def describe(self, bot: str, label: str) -> str:
        """One line for ``laibao check``: who holds the bot's connection lease (read only, never subscribes)."""
        try:
            holder = await self.store.holder(bot)
            standing_down = await self.store.standing_down(bot)
        except StoreError as exc:
            return f"websocket {label}: FAILED cannot read the lease: {exc}"
        if standing_down:
            return (f"websocket {label}: standing down for {standing_down:.0f} s more "
                    "(another client took the connection, or WeCom refused the bot id or secret)")
        if holder is None and not self.config.redis_url:
            return f"websocket {label}: no Redis: the one serving process holds the connection"
        if holder is None:
            return f"websocket {label}: no process holds the connection lease"
        node, token, left = holder
        return f"websocket {label}: held by {node} (lease token {token}, {left:.0f} s left)"

    async def _deliver(self, session: StreamSession, content: str) -> None:
        """What callback mode sends through response_url: the window's rest, or an answer's overflow."""
        chatid = session.chat or session.user
        try:
            errcode, errmsg = await self.send(session.bot, chatid, content)
        except (LongConnectionError, StoreError) as exc:
            log.error("stream %s: the rest of the answer could not be sent: %s", session.sid, exc)
            return
        if errcode:
            log.error("stream %s: aibot_send_msg refused the rest of the answer: %s", session.sid, errmsg)
        else:
            log.info("stream %s: the rest of the answer went out with aibot_send_msg", session.sid)

