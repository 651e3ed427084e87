"""The stream relay: accept a WeCom message, stream Dify's answer into the shared store, answer polls.

Nothing on the callback path waits for Dify: ``accept`` records the session, starts the relay task and
answers at once; the task keeps running after that HTTP request is gone. Any process can answer a
refresh poll, because the whole state lives in the stream store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from tornado.httpclient import AsyncHTTPClient

from laibao import texts
from laibao.auth import AuthService, AuthUnavailable, Credential, NotAuthorized
from laibao.config import BotConfig, Config
from laibao.crypto import WeComCrypto, media_item_crypto
from laibao.delivery import post_markdown
from laibao.dify import DifyClient
from laibao.errors import AuthError, DifyError, DifyHTTPError, StoreError
from laibao.media import (
    MediaError,
    MediaTooLarge,
    MediaUnsupported,
    check_upload,
    download_wecom_media,
    file_ref,
    image_item,
    image_links,
    sniff,
    split_for_wecom,
    think_blocks,
)
from laibao.metrics import Metrics
from laibao.sse import MessageDelta, MessageEnd, MessageFile, MessageReplace
from laibao.wecom import MAX_CONTENT_BYTES
from stores.base import DONE, ERROR, Stores, StreamSession, StreamStore
from stores.media_store import MediaHold
from stores.turns_store import Turns

log = logging.getLogger("laibao.relay")

CONVERSATION_GONE = "Conversation Not Exists"
MAX_IMAGES = 10  # WeCom accepts at most 10 msg_item images on the finishing reply
MODE_TTL = 600.0  # seconds the app mode and parameters from Dify are trusted
TURN_POLL = 0.2  # seconds between checks whether a queued message's turn has come
ABANDONED_CHECK_EVERY = 25  # turn checks between looks at whether the head was abandoned (~5 s)
CHAT_MODES = frozenset({"chat", "agent-chat", "advanced-chat"})


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
        self.offline = False  # the stream was finished early (window); text is only collected
        self._answer: list[str] = []  # the whole answer so far, for response_url and images
        self.first_text_at: float | None = None  # monotonic time of the first text in the store
        self.writes = 0

    @property
    def has_text(self) -> bool:
        """Some answer text was written or is waiting to be."""
        return self.first_text_at is not None or bool(self._pending)

    async def add(self, text: str) -> None:
        """Queue an answer delta; write now if enough has piled up, else within ``interval``."""
        if self._failure is not None:
            raise self._failure
        if not text:
            return
        self._answer.append(text)
        if self.offline:
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
        if self.first_text_at is None:
            self.first_text_at = time.monotonic()

    @property
    def answer(self) -> str:
        """The whole answer received so far (after any message_replace)."""
        return "".join(self._answer)

    async def close_window(self, note: str) -> bool:
        """Finish the stream now with what exists plus ``note``; keep collecting the rest offline."""
        if self.offline:
            return False
        await self.finish(DONE, note, {})
        self.offline = True
        return True

    async def replace(self, text: str) -> None:
        """Make ``text`` the whole answer (Dify's message_replace)."""
        self._answer = [text]
        if self.offline:
            return
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
        if self.offline:
            return
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


@dataclass
class BotDeps:
    """What one bot's service and relay use, built once by the Runtime."""

    bot: BotConfig
    stores: Stores
    turns: Turns
    media: MediaHold
    dify: DifyClient
    http: AsyncHTTPClient
    crypto: WeComCrypto
    config: Config
    tasks: RelayTasks
    metrics: Metrics
    auth: AuthService | None = None
    clock: Callable[[], float] = time.time
    # Long-connection mode: delivers what callback mode sends through response_url (set by the runtime).
    send_markdown: Callable[[StreamSession, str], Awaitable[None]] | None = None

    def scope_of(self, userid: str, chatid: str) -> str:
        """The conversation scope: the user in a single chat; the group, or the user in it, in groups."""
        if not chatid:
            return userid
        return chatid if self.bot.group_scope == "chat" else f"{chatid}/{userid}"

    def dify_user(self, userid: str, chatid: str) -> str:
        """The Dify ``user`` of a message: conversations are scoped by it, so it follows the scope."""
        if chatid and self.bot.group_scope == "chat":
            return f"wecom:group:{chatid}"
        return f"wecom:{userid}"

    async def credential(self, userid: str) -> Credential:
        """Who the user is for Dify; open mode needs no lookup."""
        if self.auth is None:
            return Credential(userid)
        return await self.auth.resolve(self.bot, userid)

    async def bearer(self, userid: str) -> str | None:
        """The bearer a side call (stop, feedback) for this user carries; None means the app key."""
        bearer, _ = self.call_auth(await self.credential(userid))
        return bearer

    def call_auth(self, credential: Credential) -> tuple[str | None, dict[str, Any]]:
        """(bearer, inputs) of a Dify call for this user: the token in the header or as an input."""
        if not credential.token:
            return None, {}
        if self.bot.auth_forward == "input":
            return None, {self.bot.auth_input_name: credential.token}
        return credential.token, {}


class Relay:
    """The background task of one message: wait for its turn, ask Dify, stream the answer into the store."""

    def __init__(self, deps: BotDeps) -> None:
        self.deps = deps
        self._mode: tuple[str, float] | None = None
        self._parameters: tuple[dict[str, Any], float] | None = None

    async def mode(self) -> str:
        """The app's mode from GET /info (cached); "chat" when Dify cannot tell."""
        now = time.monotonic()
        if self._mode is None or now - self._mode[1] > MODE_TTL:
            try:
                mode = str((await self.deps.dify.info()).get("mode") or "chat")
            except DifyError as exc:
                log.warning("bot %s: GET /info failed (%s); assuming a chat app", self.deps.bot.key, exc)
                return self._mode[0] if self._mode else "chat"
            self._mode = (mode, now)
        return self._mode[0]

    async def parameters(self, bearer: str | None = None) -> dict[str, Any]:
        """The app's GET /parameters (cached): opening statement, upload settings and limits."""
        now = time.monotonic()
        if self._parameters is None or now - self._parameters[1] > MODE_TTL:
            self._parameters = (await self.deps.dify.parameters(bearer), now)
        return self._parameters[0]

    async def run(self, session: StreamSession, takeover: bool = False) -> None:
        """Stream Dify's answer for ``session`` into the store until it is done or failed."""
        deps = self.deps
        writer = ChunkWriter(deps.stores.streams, session.sid, deps.config.node, deps.config.flush_interval,
                             deps.config.flush_bytes, deps.clock, replace_first=takeover)
        loop = asyncio.get_running_loop()
        beat = loop.create_task(self._keep_alive(session.sid))
        window = loop.create_task(self._watch_window(session, writer))
        started = time.monotonic()
        deps.metrics.active.inc()
        try:
            await self._answer(session, writer)
            log.info("stream %s done in %.2f s (%d writes)", session.sid, time.monotonic() - started, writer.writes)
            deps.metrics.answer.observe(time.monotonic() - started)
        except OwnershipLost:
            log.warning("stream %s: another process owns it now; this relay stops", session.sid)
        except (DifyError, MediaError, AuthError) as exc:
            if isinstance(exc, DifyError):
                deps.metrics.dify_errors.labels(deps.bot.key, _error_code(exc)).inc()
            log.warning("stream %s: failed: %s", session.sid, exc)
            await self._fail(writer, session, explain_failure(exc, deps.bot))
        except StoreError as exc:
            deps.metrics.store_errors.inc()
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
            deps.metrics.active.dec()
            if writer.first_text_at is not None:
                deps.metrics.first_content.observe(writer.first_text_at - started)
            beat.cancel()
            window.cancel()
            await writer.close()
            await self._leave(session)

    async def _answer(self, session: StreamSession, writer: ChunkWriter) -> None:
        deps = self.deps
        await self._wait_turn(session)
        if (await self._flags(session.sid)).get("stop"):
            await writer.finish(DONE, texts.STOPPED_NOTE, {})
            return
        credential = await deps.credential(session.user)
        mode = await self.mode()
        files = await self._files(session, credential)
        end, files_out = await self._ask(session, writer, credential, mode, files)
        flags = await self._flags(session.sid)
        note = ("\n\n" + texts.STOPPED_NOTE) if flags.get("stop") else ""
        answer = writer.answer + note
        _, rest = render_answer(answer, deps.bot.think, final=True)
        fields = {"conversation_id": end.conversation_id, "message_id": end.message_id, "task_id": end.task_id}
        # Only links to Dify's own files: a link the model wrote must not make laibao fetch internal hosts.
        linked = [url for url in image_links(writer.answer) if deps.dify.is_own_url(url)]
        items = await self._images(files_out + linked)
        if items:
            fields["items"] = json.dumps(items)
        offline = writer.offline
        await writer.finish(DONE, note, fields)
        if end.conversation_id and mode in CHAT_MODES:
            await deps.stores.conversations.set(deps.bot.key, session.scope, end.conversation_id,
                                                deps.bot.conversation_ttl)
        if offline:
            # The stream was closed before the answer was complete: send all of it.
            await self._deliver(session, think_blocks(answer, deps.bot.think, final=True))
        elif rest:
            await self._deliver(session, rest)

    async def _wait_turn(self, session: StreamSession) -> None:
        """Messages of one conversation reach Dify one at a time, in arrival order, across processes."""
        turns = self.deps.turns.turns
        await turns.join(self.deps.bot.key, session.scope, session.sid, self.deps.config.stream_ttl)
        # Polled, not notified: the message ahead may be relayed by another process.
        checks = 0
        while not await turns.my_turn(self.deps.bot.key, session.scope, session.sid):
            checks += 1
            if checks % ABANDONED_CHECK_EVERY == 1:  # at once, then every few seconds
                await self._drop_abandoned_head(session.scope)
            await asyncio.sleep(TURN_POLL)

    async def _drop_abandoned_head(self, scope: str) -> None:
        """Unblock a conversation whose head died after WeCom stopped polling it (nobody will take it over)."""
        deps = self.deps
        head = await deps.turns.turns.head(deps.bot.key, scope)
        ahead = await deps.stores.streams.get(head) if head else None
        now = deps.clock()
        if ahead is not None and now > ahead.deadline and now - ahead.heartbeat > deps.config.lease:
            log.warning("stream %s: abandoned by %s after WeCom's window; dropped from its queue",
                        ahead.sid, ahead.owner or "(released)")
            await deps.turns.turns.leave(deps.bot.key, scope, ahead.sid)

    async def _leave(self, session: StreamSession) -> None:
        try:
            await self.deps.turns.turns.leave(self.deps.bot.key, session.scope, session.sid)
            await self.deps.turns.inflight.release(self.deps.bot.key, session.user, session.sid)
        except StoreError as exc:
            # Both entries are dropped by the next reader once the session is over or stale.
            log.warning("stream %s: could not leave the queue: %s", session.sid, exc)

    async def _flags(self, sid: str) -> Mapping[str, str]:
        """The session's extras (e.g. the /stop flag); none while the store is unreachable."""
        try:
            session = await self.deps.stores.streams.get(sid)
        except StoreError as exc:
            # Only a /stop note could be missed; the answer itself must not be lost over it.
            log.warning("stream %s: could not read its flags: %s", sid, exc)
            return {}
        return session.extra if session is not None else {}

    async def _files(self, session: StreamSession, credential: Credential) -> list[dict[str, str]]:
        """Dify ``files`` for the message's media: downloaded from WeCom, decrypted, uploaded for the user."""
        if "files" in session.extra:  # uploaded before a takeover: the same files again
            files: list[dict[str, str]] = json.loads(session.extra["files"])
            return files
        media = json.loads(session.extra.get("media", "[]"))
        if not media:
            return []
        deps = self.deps
        bearer, _ = deps.call_auth(credential)
        parameters = await self.parameters(bearer)
        files = []
        for item in media:
            crypto = media_item_crypto(item["aeskey"]) if item.get("aeskey") else deps.crypto
            data = await download_wecom_media(deps.http, item["url"], crypto, deps.config.media_max_bytes,
                                              timeout=30.0)
            kind = sniff(data, item.get("kind", ""))
            dify_type = check_upload(kind, len(data), parameters)
            upload = await deps.dify.upload_file(data, kind.filename(f"wecom-{len(files) + 1}"), kind.mime_type,
                                                 deps.dify_user(session.user, session.chat), bearer)
            files.append(file_ref(dify_type, upload))
        await deps.stores.streams.annotate(session.sid, {"files": json.dumps(files)})
        return files

    async def _ask(
        self, session: StreamSession, writer: ChunkWriter, credential: Credential, mode: str,
        files: list[dict[str, str]],
    ) -> tuple[MessageEnd, list[str]]:
        """The Dify call, retried once with a new conversation (404) or a fresh user token (401)."""
        deps = self.deps
        conversation_id = ""
        if mode in CHAT_MODES:
            conversation_id = await deps.stores.conversations.get(deps.bot.key, session.scope) or ""
        token_retried = False
        while True:
            try:
                return await self._stream(session, writer, credential, mode, files, conversation_id)
            except DifyHTTPError as exc:
                if conversation_id and exc.status == 404 and exc.message.startswith(CONVERSATION_GONE):
                    log.info("stream %s: Dify lost the conversation; starting a new one", session.sid)
                    await deps.stores.conversations.delete(deps.bot.key, session.scope)
                    conversation_id = ""
                    continue
                if exc.status == 401 and credential.token and deps.auth is not None:
                    # Dropped everywhere (Redis and every process's cache) before signing in again.
                    await deps.auth.invalidate(session.user, credential.token)
                    if token_retried:
                        raise AuthUnavailable(session.user, "token refused by Dify twice") from exc
                    log.info("stream %s: Dify refused the user's token; signing in again", session.sid)
                    credential = await deps.auth.resolve(deps.bot, session.user)
                    token_retried = True
                    continue
                raise

    async def _stream(
        self, session: StreamSession, writer: ChunkWriter, credential: Credential, mode: str,
        files: list[dict[str, str]], conversation_id: str,
    ) -> tuple[MessageEnd, list[str]]:
        deps = self.deps
        bearer, inputs = deps.call_auth(credential)
        events = deps.dify.chat_stream(query=session.query, user=deps.dify_user(session.user, session.chat),
                                       conversation_id=conversation_id, inputs=inputs, files=files or None,
                                       mode=mode, bearer=bearer)
        images: list[str] = []
        task_seen = False
        # aclosing: returning at message_end must still close the HTTP stream at once.
        async with contextlib.aclosing(events):
            async for event in events:
                if event.task_id and not task_seen:
                    task_seen = True
                    await self._note_task(session, event.task_id, mode, bearer)
                if isinstance(event, MessageDelta):
                    await writer.add(event.answer)
                elif isinstance(event, MessageReplace):
                    await writer.replace(event.answer)
                elif isinstance(event, MessageFile) and event.file_type == "image" and event.url:
                    images.append(event.url)
                elif isinstance(event, MessageEnd):
                    return event, images
        raise DifyError("Dify stream ended without message_end")  # the client raises first; kept for safety

    async def _note_task(self, session: StreamSession, task_id: str, mode: str, bearer: str | None) -> None:
        """Record Dify's task id so /stop on any process can reach it; honour a /stop that came first."""
        deps = self.deps
        try:
            await deps.stores.streams.annotate(session.sid, {"task_id": task_id, "mode": mode})
        except StoreError as exc:
            log.warning("stream %s: could not record the task id (/stop cannot reach it): %s", session.sid, exc)
            return
        if (await self._flags(session.sid)).get("stop"):
            await deps.dify.stop(task_id, deps.dify_user(session.user, session.chat), mode, bearer)

    async def _images(self, urls: list[str]) -> list[dict[str, Any]]:
        """WeCom msg_item images for the answer's generated images (JPG/PNG, at most 10)."""
        items = []
        for url in urls[:MAX_IMAGES]:
            item = await image_item(self.deps.dify.fetch, url)
            if item is not None:
                items.append(item)
        return items

    async def _deliver(self, session: StreamSession, content: str) -> None:
        """Send ``content`` through the message's response_url (once)."""
        if self.deps.send_markdown is not None and content.strip():
            # Long-connection mode: no response_url; the bot's connection sends it, wherever it is held.
            await self.deps.send_markdown(session, content)
            return
        if not session.response_url or not content.strip():
            return
        # One response_url message holds 20480 bytes too, and it can be used only once.
        content, _ = fit(content, texts.TRUNCATED_NOTE)
        delivered = await post_markdown(self.deps.http, session.response_url, content,
                                        retries=self.deps.config.response_url_retries)
        log.log(logging.INFO if delivered else logging.ERROR, "stream %s: response_url delivery %s",
                session.sid, "done" if delivered else "failed")

    async def _watch_window(self, session: StreamSession, writer: ChunkWriter) -> None:
        """Close the stream shortly before WeCom stops polling; the full answer follows via response_url."""
        config = self.deps.config
        closes = session.created + config.stream_window - config.window_margin
        await asyncio.sleep(max(0.0, closes - self.deps.clock()))
        try:
            if await writer.close_window("\n\n" + texts.WINDOW_NOTE):
                log.info("stream %s: WeCom's window closes; the rest follows via response_url", session.sid)
        except (StoreError, OwnershipLost) as exc:
            log.warning("stream %s: could not close the stream before the window: %s", session.sid, exc)

    async def _release(self, sid: str) -> None:
        try:
            if await self.deps.stores.streams.release(sid, self.deps.config.node):
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

    async def _keep_alive(self, sid: str) -> None:
        """Refresh the session's heartbeat while the relay runs, so no other process takes it over."""
        period = self.deps.config.lease / 3
        while True:
            await asyncio.sleep(period)
            try:
                if not await self.deps.stores.streams.heartbeat(sid, self.deps.config.node, self.deps.clock()):
                    return
            except StoreError as exc:
                log.warning("stream %s: heartbeat failed: %s", sid, exc)


def render_answer(text: str, think: str, final: bool) -> tuple[str, str]:
    """(what the stream shows, what must follow via response_url) for an answer's raw text.

    Reasoning is shown as WeCom's <think> or hidden; an answer over 20480 UTF-8 bytes shows its first
    part with a note saying the rest follows.
    """
    # Every reasoning form starts with "<": most answers skip the parser (this runs on every poll).
    content = think_blocks(text, think, final=final) if "<" in text else text
    return fit(content, texts.OVERFLOW_NOTE)


def fit(content: str, note: str) -> tuple[str, str]:
    """(content cut to WeCom's 20480 bytes, the rest); when cut, ``note`` ends the shown part."""
    head, rest = split_for_wecom(content)
    if not rest:
        return head, ""
    tail = "\n\n" + note
    head, rest = split_for_wecom(content, MAX_CONTENT_BYTES - len(tail.encode("utf-8")))
    return head + tail, rest


def explain_failure(exc: Exception, bot: BotConfig) -> str:
    """The short sentence a user sees for a failed answer, media and sign-in included."""
    if isinstance(exc, NotAuthorized):
        return bot.denied_text
    if isinstance(exc, AuthError):
        return texts.SIGN_IN_FAILED
    if isinstance(exc, MediaTooLarge):
        return texts.MEDIA_TOO_LARGE
    if isinstance(exc, MediaUnsupported):
        return texts.MEDIA_UNSUPPORTED
    if isinstance(exc, MediaError):
        return texts.MEDIA_UNAVAILABLE
    if isinstance(exc, DifyHTTPError) and exc.status == 413:
        return texts.MEDIA_TOO_LARGE
    if isinstance(exc, DifyHTTPError) and exc.status == 415:
        return texts.MEDIA_UNSUPPORTED
    return texts.explain(exc)


def _error_code(exc: DifyError) -> str:
    """A bounded label for the Dify error metric."""
    code = getattr(exc, "code", "") or ""
    if code:
        return str(code)[:40]
    return type(exc).__name__


def new_id() -> str:
    """A new stream id."""
    return uuid.uuid4().hex
