"""One message's answer: wait for its turn, ask Dify, stream the answer into the store.

``Answers`` (one per bot) starts a job for each new message this process may take, up to the
process's cap, and takes over sessions whose owner died, was draining or was full. An ``AnswerJob``
lives as long as its message; it keeps running when the HTTP request that started it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from laibao import texts
from laibao.answer.budget import ByteBudget
from laibao.answer.difyapp import CHAT_MODES, DifyApp
from laibao.answer.outbox import Outbox
from laibao.answer.render import explain_failure, fit, render_answer, think_blocks
from laibao.answer.retry import retrying
from laibao.answer.tasks import AnswerTasks
from laibao.answer.writer import Flusher, StreamWriter
from laibao.auth import Credential
from laibao.config import BotConfig, Config
from laibao.crypto import WeComCrypto, media_item_crypto
from laibao.delivery import post_markdown
from laibao.dify import error_label
from laibao.errors import (
    AuthError,
    AuthUnavailable,
    DifyError,
    DifyHTTPError,
    MediaError,
    MediaUnavailable,
    OwnershipLost,
    StoreError,
)
from laibao.media import (
    IMAGE_MAX_BYTES,
    check_upload,
    download_wecom_media,
    file_ref,
    image_item,
    image_links,
    sniff,
)
from laibao.metrics import Metrics
from laibao.outbound import Outbound
from laibao.sse import MessageDelta, MessageEnd, MessageFile, MessageReplace
from laibao.wecom import MAX_CONTENT_BYTES
from stores.base import DONE, ERROR, TERMINAL, ConversationStore, StreamSession, StreamStore
from stores.relay_store import RELAY_ON, RelayState
from stores.turns_store import HEAD, NOT_QUEUED, InFlight, TurnQueue, relay_running

log = logging.getLogger("laibao.answer")
T = TypeVar("T")

CONVERSATION_GONE = "Conversation Not Exists"
COMMAND_FIELD = "command"  # session extra of a deferred command (user not yet admitted): what to carry out
MAX_IMAGES = 10  # WeCom accepts at most 10 msg_item images on the finishing reply
TURN_POLL = 0.2  # seconds between checks whether a queued message's turn has come
ABANDONED_CHECK_EVERY = 25  # turn checks between looks at whether the head was abandoned (~5 s)
FLAGS_BUDGET = 5.0  # seconds a /stop-flag read is retried: missing a /stop note must not hold an answer
# What can ever be delivered: the stream's 20480 bytes and one response_url message of as many.
DELIVERABLE_BYTES = 2 * MAX_CONTENT_BYTES
CHECK_STEP = 4096  # characters of raw answer between two measurements of what it renders to


@dataclass(frozen=True)
class WeComFiles:
    """Where a message's media and its response_url delivery go: the shared HTTP client and the bot's key."""

    http: Outbound
    crypto: WeComCrypto
    max_bytes: int
    response_url_retries: int
    budget: ByteBudget  # media bytes in memory on this process
    media_deadline: float  # seconds for all of one answer's media (downloads and uploads, or images)


class Transcript:
    """The answer received so far (after any message_replace), kept only as far as it can be delivered.

    What WeCom can ever show is the stream's 20480 bytes plus one response_url message of as many, so
    once the rendered answer passes both, further text is dropped (``full``), and once it passes the
    stream's part the store needs none of it (``stream_full``). The raw text (hidden reasoning
    included) is never kept past ``max_raw`` characters' worth of bytes.
    """

    def __init__(self, think: str, max_raw: int) -> None:
        self._think = think
        self._max_raw = max_raw
        self._parts: list[str] = []
        self._bytes = 0
        self._next_check = MAX_CONTENT_BYTES
        self.measured = 0  # how often the rendered size was measured (each one linear in the text)
        self.stream_full = False
        self.full = False

    def add(self, text: str) -> str:
        """Append a delta; the part of it the stream still needs (all, some or none)."""
        kept: list[str] = []
        # Measured every CHECK_STEP characters, so a delta of megabytes is taken in pieces.
        for start in range(0, len(text), CHECK_STEP):
            if self.full:
                break
            piece = text[start:start + CHECK_STEP]
            self._parts.append(piece)
            if not self.stream_full:
                kept.append(piece)
            self._bytes += len(piece.encode("utf-8", "surrogatepass"))
            if self._bytes >= self._next_check:
                self._measure()
        return "".join(kept)

    def replace(self, text: str) -> str:
        """Make ``text`` the whole answer; the part of it the stream needs."""
        self._parts, self._bytes, self._next_check = [], 0, MAX_CONTENT_BYTES
        self.stream_full = self.full = False
        return self.add(text)

    def _measure(self) -> None:
        self._next_check = self._bytes + CHECK_STEP
        self.measured += 1
        shown = len(render_answer(self.text, self._think, final=False, cut=False)[0].encode("utf-8", "surrogatepass"))
        self.stream_full = shown > MAX_CONTENT_BYTES
        self.full = shown > DELIVERABLE_BYTES or self._bytes > self._max_raw

    @property
    def text(self) -> str:
        """Everything kept."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


class Answers:
    """One bot's answer jobs on this process: started up to the process's cap, or taken over."""

    def __init__(self, *, bot: BotConfig, app: DifyApp, streams: StreamStore, conversations: ConversationStore,
                 turns: TurnQueue, inflight: InFlight, files: WeComFiles, flusher: Flusher, tasks: AnswerTasks,
                 metrics: Metrics, config: Config, relay: RelayState, outbox: Outbox,
                 clock: Callable[[], float] = time.time) -> None:
        self.bot = bot
        self.app = app
        self.streams = streams
        self.conversations = conversations
        self.turns = turns
        self.inflight = inflight
        self.files = files
        self.flusher = flusher
        self.tasks = tasks
        self.metrics = metrics
        self.config = config
        self.relay = relay
        self.outbox = outbox
        self.clock = clock
        # Set by the bot's service: carries out a deferred command (COMMAND_FIELD) after a takeover.
        self.resume_command: Callable[[StreamSession], Coroutine[Any, Any, None]] | None = None
        # Set in long-connection mode: delivers what callback mode sends through response_url.
        self.send_markdown: Callable[[StreamSession, str], Awaitable[None]] | None = None

    def start(self, session: StreamSession, takeover: bool = False) -> bool:
        """Start the job of ``session`` here if this process has room; False (nothing started) if not."""
        if not self.tasks.has_room():
            if not self.tasks.draining:
                self.metrics.cap_hits.inc()
            return False
        writer = StreamWriter(self.flusher, session.sid, self.config.node, index=session.n,
                              replace_first=takeover, clock=self.clock)
        self.tasks.start_answer(AnswerJob(self, session, writer).run(), name=f"answer-{session.sid}")
        return True

    async def take_over(self, sid: str, previous_owner: str) -> None:
        """Adopt a session whose owner died (stale heartbeat), was draining or full; one process wins."""
        if not self.tasks.has_room():
            return  # full or draining: the session waits, unowned, for a process with room
        if not await self.streams.take_over(sid, self.config.node, self.clock(), self.config.lease):
            return
        session = await self.streams.get(sid)
        if session is None:
            return
        self.metrics.takeovers.labels(self.bot.key).inc()
        log.warning("bot %s: took over stream %s from %s", self.bot.key, sid, previous_owner or "(released)")
        if COMMAND_FIELD in session.extra and self.resume_command is not None:
            # A command whose user's admission was still being decided, not a question for Dify.
            self.tasks.spawn(self.resume_command(session), name=f"command-{sid}")
            return
        self.start(session, takeover=True)


class AnswerJob:
    """The background work of one message, from its turn to the finished stream."""

    def __init__(self, answers: Answers, session: StreamSession, writer: StreamWriter) -> None:
        self.session = session
        self.writer = writer
        self.transcript = Transcript(answers.bot.think, answers.config.max_answer_bytes)
        self.asked = False  # the message reached its turn (and Dify)
        # What every job of the bot shares, named here once rather than reached through chains.
        self.bot = answers.bot
        self.app = answers.app
        self.streams = answers.streams
        self.conversations = answers.conversations
        self.turns = answers.turns
        self.inflight = answers.inflight
        self.files = answers.files
        self.metrics = answers.metrics
        self.config = answers.config
        self.relay = answers.relay
        self.outbox = answers.outbox
        self.clock = answers.clock
        self.send_markdown = answers.send_markdown

    async def run(self) -> None:
        """Stream Dify's answer into the store until it is done or failed."""
        session, writer = self.session, self.writer
        loop = asyncio.get_running_loop()
        beat = loop.create_task(self._keep_alive())
        window = loop.create_task(self._watch_window())
        started = time.monotonic()
        self.metrics.active.inc()
        try:
            await self._answer()
            log.info("stream %s done in %.2f s (%d writes)", session.sid, time.monotonic() - started, writer.writes)
            self.metrics.answer.observe(time.monotonic() - started)
        except OwnershipLost:
            log.warning("stream %s: another process owns it now; this answer stops", session.sid)
        except Unanswerable as exc:
            log.warning("stream %s: not answered: %s", session.sid, exc.reason)
            await self._fail(exc.message)
        except (DifyError, MediaError, AuthError) as exc:
            if isinstance(exc, DifyError):
                self.metrics.dify_errors.labels(self.bot.key, error_label(exc)).inc()
            log.warning("stream %s: failed: %s", session.sid, exc)
            await self._fail(explain_failure(exc, self.bot))
        except StoreError as exc:
            self.metrics.store_errors.inc()
            log.error("stream %s: store unavailable past the retry budget; another process takes it over "
                      "after the lease: %s", session.sid, exc)
        except asyncio.CancelledError:
            # Shutdown past the grace period: hand the session to another process at once.
            await asyncio.shield(self._release())
            raise
        except Exception:
            log.exception("stream %s: answer crashed", session.sid)
            await self._fail(texts.GENERIC_ERROR)
        finally:
            self.metrics.active.dec()
            if writer.first_text_at is not None:
                self.metrics.first_content.observe(writer.first_text_at - started)
            beat.cancel()
            window.cancel()
            await self._leave()

    async def _answer(self) -> None:
        session, writer = self.session, self.writer
        waited = await self._wait_turn()
        if waited is None:
            return  # its session vanished or ended while it waited: the user was told, if possible
        self.asked = True
        # A /stop reaches the head of the queue only: one that came while this message waited is seen
        # here; one that comes later is seen once Dify's task id is recorded.
        if waited and (await self._flags()).get("stop"):
            await writer.finish(DONE, texts.STOPPED_NOTE, {})
            return
        credential = await self.app.credential(session.user)
        mode = await self.app.mode()
        files = await self._media_step(self._files(credential))
        end, files_out = await self._ask(credential, mode, files)
        flags = await self._flags()
        note = ("\n\n" + texts.STOPPED_NOTE) if flags.get("stop") else ""
        if self.transcript.full:
            log.warning("stream %s: answer cut at what WeCom can show", session.sid)
        answer = self.transcript.text + note
        _, rest = render_answer(answer, self.bot.think, final=True)
        fields = {"conversation_id": end.conversation_id, "message_id": end.message_id, "task_id": end.task_id}
        # Only links to Dify's own files: a link the model wrote must not make laibao fetch internal hosts.
        linked = [url for url in image_links(self.transcript.text) if self.app.client.is_own_url(url)]
        try:
            items = await self._media_step(self._images(files_out + linked))
        except MediaUnavailable as exc:
            log.warning("stream %s: images left out: %s", session.sid, exc)
            items = []
        if items:
            fields["items"] = json.dumps(items)
        if end.conversation_id and mode in CHAT_MODES:
            # Before the finish: the conversation's next message may start the moment this one is over.
            await retrying(lambda: self.conversations.set(self.bot.key, session.scope, end.conversation_id,
                                                          self.bot.conversation_ttl),
                           f"stream {session.sid} conversation")
        # False when WeCom's window closed the stream first: the whole answer goes via response_url.
        shown = await writer.finish(DONE, note, fields)
        await self._hand_over(rest if shown else think_blocks(answer, self.bot.think, final=True))

    async def _media_step(self, step: Awaitable[T]) -> T:
        """``step`` within the media deadline: a slow WeCom or Dify file host cannot hold the answer."""
        try:
            async with asyncio.timeout(self.files.media_deadline):
                return await step
        except TimeoutError as exc:
            raise MediaUnavailable(f"media took longer than {self.files.media_deadline:g} s") from exc

    async def _wait_turn(self) -> bool | None:
        """Messages of one conversation reach Dify one at a time, in arrival order, across processes.

        False if the message was at the head of its queue at once, True once its turn came after a
        wait; None if its session vanished or ended meanwhile (the user is told via response_url);
        raises Unanswerable past LAIBAO_TURN_WAIT.
        """
        bot, scope, sid = self.bot.key, self.session.scope, self.session.sid
        position = await retrying(lambda: self.turns.join(bot, scope, sid, self.config.stream_ttl),
                                  f"stream {sid} turns")
        if position == 0:
            return False  # at the head already: no second round trip to ask
        deadline = self.clock() + self.config.turn_wait
        # Polled, not notified: the message ahead may be relayed by another process.
        checks = 0
        while True:
            state = await retrying(lambda: self.turns.my_turn(bot, scope, sid, self.clock()), f"stream {sid} turns")
            if state == HEAD:
                return True
            if state == NOT_QUEUED:
                # The queue or this session vanished (eviction, failover, FLUSHALL), or the session ended.
                mine = await retrying(lambda: self.streams.get(sid), f"stream {sid} turns")
                if mine is None:
                    log.warning("stream %s: its session vanished while it waited for its turn", sid)
                    await self._tell(texts.LOST)
                    return None
                if not relay_running(mine, self.clock(), self.config.lease):
                    log.warning("stream %s: ended while it waited for its turn", sid)
                    return None
                log.warning("stream %s: its turn queue vanished; queued again", sid)
                await retrying(lambda: self.turns.join(bot, scope, sid, self.config.stream_ttl),
                               f"stream {sid} turns")
            if self.clock() > deadline:
                raise Unanswerable(texts.TURN_TIMEOUT, f"no turn within {self.config.turn_wait:g} s")
            checks += 1
            if checks % ABANDONED_CHECK_EVERY == 1:  # at once, then every few seconds
                await retrying(self._drop_abandoned_head, f"stream {sid} turns")
            await asyncio.sleep(TURN_POLL)

    async def _drop_abandoned_head(self) -> None:
        """Unblock a conversation whose head died after WeCom stopped polling it (nobody will take it over)."""
        head = await self.turns.head(self.bot.key, self.session.scope)
        ahead = await self.streams.get(head) if head else None
        now = self.clock()
        if ahead is None or ahead.status in TERMINAL:
            return  # closed for the window: MY_TURN judges it by its relay's own heartbeat (x:beat)
        if now > ahead.deadline and now - ahead.heartbeat > self.config.lease:
            log.warning("stream %s: abandoned by %s after WeCom's window; dropped from its queue",
                        ahead.sid, ahead.owner or "(released)")
            await self.turns.leave(self.bot.key, self.session.scope, ahead.sid)

    async def _leave(self) -> None:
        session = self.session
        try:
            # Relay over: turns and admission are free for the next message (before the queue entry goes).
            await retrying(lambda: self.relay.end(session.sid), f"stream {session.sid} leave", budget=10.0)
            await retrying(lambda: self.turns.leave(self.bot.key, session.scope, session.sid),
                           f"stream {session.sid} leave", budget=10.0)
            await retrying(lambda: self.inflight.release(self.bot.key, session.user, session.sid),
                           f"stream {session.sid} leave", budget=10.0)
        except StoreError as exc:
            # Both entries are dropped by the next reader once the session is over or stale.
            log.warning("stream %s: could not leave the queue: %s", session.sid, exc)

    async def _flags(self) -> Mapping[str, str]:
        """The session's extras (e.g. the /stop flag); none while the store stays unreachable."""
        sid = self.session.sid
        try:
            session = await retrying(lambda: self.streams.get(sid), f"stream {sid} flags", FLAGS_BUDGET)
        except StoreError as exc:
            # Only a /stop note could be missed; the answer itself must not be lost over it.
            log.warning("stream %s: could not read its flags: %s", sid, exc)
            return {}
        return session.extra if session is not None else {}

    async def _files(self, credential: Credential) -> list[dict[str, str]]:
        """Dify ``files`` for the message's media: downloaded from WeCom, decrypted, uploaded for the user."""
        session = self.session
        if "files" in session.extra:  # uploaded before a takeover: the same files again
            files: list[dict[str, str]] = json.loads(session.extra["files"])
            return files
        media = json.loads(session.extra.get("media", "[]"))
        if not media:
            return []
        bearer, _ = self.app.call_auth(credential)
        parameters = await self.app.parameters(bearer)
        files = []
        for item in media:
            # Long-connection mode encrypts each item with its own aeskey; callbacks with the bot's key.
            crypto = media_item_crypto(item["aeskey"]) if item.get("aeskey") else self.files.crypto
            # Encrypted copy, plaintext and upload body: about three times the file at once.
            async with self.files.budget.hold(3 * self.files.max_bytes):
                data = await download_wecom_media(self.files.http, item["url"], crypto, self.files.max_bytes,
                                                  timeout=30.0)
                kind = sniff(data, item.get("kind", ""))
                dify_type = check_upload(kind, len(data), parameters)
                upload = await self.app.client.upload_file(data, kind.filename(f"wecom-{len(files) + 1}"),
                                                           kind.mime_type,
                                                           self.app.dify_user(session.user, session.chat), bearer)
                del data
            files.append(file_ref(dify_type, upload))
        await retrying(lambda: self.streams.annotate(session.sid, {"files": json.dumps(files)}),
                       f"stream {session.sid} files")
        return files

    async def _ask(self, credential: Credential, mode: str,
                   files: list[dict[str, str]]) -> tuple[MessageEnd, list[str]]:
        """The Dify call, retried once with a new conversation (404) or a fresh user token (401)."""
        session, auth = self.session, self.app.auth
        conversation_id = ""
        if mode in CHAT_MODES:
            stored: str | None = await retrying(lambda: self.conversations.get(self.bot.key, session.scope),
                                                f"stream {session.sid} conversation")
            conversation_id = stored or ""
        token_retried = False
        while True:
            try:
                return await self._stream(credential, mode, files, conversation_id)
            except DifyHTTPError as exc:
                if conversation_id and exc.status == 404 and exc.message.startswith(CONVERSATION_GONE):
                    log.info("stream %s: Dify lost the conversation; starting a new one", session.sid)
                    await self.conversations.delete(self.bot.key, session.scope)
                    conversation_id = ""
                    continue
                if exc.status == 401 and credential.token and auth is not None:
                    # Dropped everywhere (Redis and every process's cache) before signing in again.
                    await auth.invalidate(session.user, credential.token)
                    if token_retried:
                        raise AuthUnavailable(session.user, "token refused by Dify twice") from exc
                    log.info("stream %s: Dify refused the user's token; signing in again", session.sid)
                    credential = await auth.resolve(self.bot, session.user)
                    token_retried = True
                    continue
                raise

    async def _stream(self, credential: Credential, mode: str, files: list[dict[str, str]],
                      conversation_id: str) -> tuple[MessageEnd, list[str]]:
        session, writer = self.session, self.writer
        bearer, inputs = self.app.call_auth(credential)
        events = self.app.client.chat_stream(query=session.query, user=self.app.dify_user(session.user, session.chat),
                                             conversation_id=conversation_id, inputs=inputs, files=files or None,
                                             mode=mode, bearer=bearer)
        images: list[str] = []
        task_seen = False
        # aclosing: returning at message_end must still close the HTTP stream at once.
        async with contextlib.aclosing(events):
            async for event in events:
                if event.task_id and not task_seen:
                    task_seen = True
                    await self._note_task(event.task_id, mode, bearer)
                if isinstance(event, MessageDelta):
                    writer.add(self.transcript.add(event.answer))
                elif isinstance(event, MessageReplace):
                    await writer.replace(self.transcript.replace(event.answer))
                elif isinstance(event, MessageFile) and event.file_type == "image" and event.url:
                    images.append(event.url)
                elif isinstance(event, MessageEnd):
                    return event, images
        raise DifyError("Dify stream ended without message_end")  # the client raises first; kept for safety

    async def _note_task(self, task_id: str, mode: str, bearer: str | None) -> None:
        """Record Dify's task id so /stop on any process can reach it; honour a /stop that came first."""
        session = self.session
        try:
            await retrying(lambda: self.streams.annotate(session.sid, {"task_id": task_id, "mode": mode}),
                           f"stream {session.sid} task id", FLAGS_BUDGET)
        except StoreError as exc:
            log.warning("stream %s: could not record the task id (/stop cannot reach it): %s", session.sid, exc)
            return
        if (await self._flags()).get("stop"):
            await self.app.client.stop(task_id, self.app.dify_user(session.user, session.chat), mode, bearer)

    async def _images(self, urls: list[str]) -> list[dict[str, Any]]:
        """WeCom msg_item images for the answer's generated images (JPG/PNG, at most 10)."""
        items = []
        for url in urls[:MAX_IMAGES]:
            # Raw image, its base64 and the JSON around it.
            async with self.files.budget.hold(3 * IMAGE_MAX_BYTES):
                item = await image_item(self.app.client.fetch, url)
            if item is not None:
                items.append(item)
        return items

    async def _hand_over(self, content: str) -> None:
        """Leave ``content`` for the response_url where any process can deliver it, then deliver it (once).

        In long-connection mode there is no response_url: the bot's connection sends it.
        """
        session = self.session
        if self.send_markdown is not None and content.strip():
            # Long-connection mode: no response_url; the bot's connection sends it, wherever it is held.
            await self.send_markdown(session, content)
            return
        if not session.response_url or not content.strip():
            return
        # One response_url message holds 20480 bytes too, and it can be used only once.
        content, _ = fit(content, texts.TRUNCATED_NOTE)
        if await retrying(lambda: self.relay.finished(session.sid, content, self.clock()),
                          f"stream {session.sid} outbox"):
            await self.outbox.deliver(session.sid, session.response_url)
        else:
            await self._tell(content)  # the session vanished: nobody else could deliver it anyway

    async def _tell(self, content: str) -> None:
        """Post ``content`` to the response_url directly (the session is gone, so no claim is possible)."""
        session = self.session
        if self.send_markdown is not None:
            await self.send_markdown(session, content)
        elif session.response_url:
            delivered = await post_markdown(self.files.http, session.response_url, content,
                                            retries=self.files.response_url_retries)
            log.log(logging.INFO if delivered else logging.ERROR, "stream %s: response_url note %s",
                    session.sid, "done" if delivered else "failed")

    async def _watch_window(self) -> None:
        """Close the stream shortly before WeCom stops polling; the answer follows via response_url.

        The session is then ``done`` for WeCom but its relay is ``on``: turns and admission go on
        counting it until the relay itself ends.
        """
        closes = self.session.created + self.config.stream_window - self.config.window_margin
        await asyncio.sleep(max(0.0, closes - self.clock()))
        if self.writer.closed:
            return
        sid = self.session.sid
        note = texts.WINDOW_NOTE if self.asked else texts.QUEUED_NOTE
        tail = ("\n\n" + note) if self.writer.has_text else note
        now = self.clock()
        try:
            await retrying(lambda: self.relay.track(sid, now), f"stream {sid} window")
            if await self.writer.finish(DONE, tail, {"relay": RELAY_ON, "beat": repr(now)}):
                log.info("stream %s: WeCom's window closes; the rest follows via response_url", sid)
        except (StoreError, OwnershipLost) as exc:
            log.warning("stream %s: could not close the stream before the window: %s", sid, exc)

    async def _release(self) -> None:
        sid = self.session.sid
        try:
            if await self.streams.release(sid, self.config.node):
                log.warning("stream %s released for another process to finish", sid)
        except StoreError as exc:
            log.error("stream %s: could not release (taken over after the lease): %s", sid, exc)

    async def _fail(self, message: str) -> None:
        """End the stream with a short explanation after whatever was already shown (or via response_url)."""
        tail = ("\n\n" + message) if self.writer.has_text else message
        try:
            if not await self.writer.finish(ERROR, tail, {}):
                # WeCom's window closed the stream: the explanation must follow like an answer would.
                await self._hand_over(message)
        except (StoreError, OwnershipLost) as exc:
            log.error("stream %s: could not record the failure: %s", self.session.sid, exc)

    async def _keep_alive(self) -> None:
        """Refresh the heartbeat while the answer runs, so no other process takes it over.

        Every text write refreshes it too, so a streaming answer needs no separate call.
        """
        period = self.config.lease / 3
        sid, node = self.session.sid, self.config.node
        while True:
            await asyncio.sleep(period)
            if time.monotonic() - self.writer.last_write < period and not self.writer.closed:
                continue
            try:
                # Past WeCom's window the stream is closed: the relay's own heartbeat keeps its turn.
                if not (await self.streams.heartbeat(sid, node, self.clock())
                        or await self.relay.beat(sid, node, self.clock())):
                    return
            except StoreError as exc:
                log.warning("stream %s: heartbeat failed: %s", sid, exc)


class Unanswerable(Exception):
    """The message cannot be answered; ``message`` tells the user why."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(reason)
        self.message = message
        self.reason = reason
