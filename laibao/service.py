"""One bot's answer to every callback: messages, commands, refresh polls and events.

Nothing here waits for Dify's answer: ``accept`` records the session, starts the relay task and
answers at once; any process answers a refresh poll from the shared store.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

from cachetools import LRUCache

from laibao import texts
from laibao.auth import AuthUnavailable, NotAuthorized
from laibao.commands import HELP, NEW, STOP, help_text, read_message
from laibao.dify import DifyClient
from laibao.errors import DifyError, LaibaoError, StoreError
from laibao.relay import BotDeps, Relay, new_id, render_answer
from laibao.wecom import Callback, stream_reply, text_reply
from stores.base import DONE, Snapshot, StreamSession

log = logging.getLogger("laibao.service")

SHOWN_CACHE_SIZE = 10000
MAX_IN_FLIGHT = 3  # WeCom's own limit of one user's messages being answered at once
WELCOME_TIMEOUT = 2.0  # enter_chat must be answered at once: Dify's opening statement or the default
# feedback_event reasons (WeCom's codes) as the text Dify stores with a dislike
REASONS = {1: "答非所问", 2: "回答不完整", 3: "回答有误", 4: "数据分析有误"}


class BotService:
    """Everything one bot does with a callback."""

    def __init__(self, deps: BotDeps) -> None:
        self.deps = deps
        self.bot = deps.bot
        self.relay = Relay(deps)
        # The last content each stream showed, so a poll during a store outage never shows less.
        self._shown: LRUCache[str, str] = LRUCache(maxsize=SHOWN_CACHE_SIZE)

    @property
    def dify(self) -> DifyClient:
        """The bot's Dify client."""
        return self.deps.dify

    async def on_callback(self, callback: Callback) -> dict[str, Any] | None:
        """The plaintext reply to one callback, or None for an empty HTTP 200."""
        try:
            if callback.msgtype == "stream":
                return await self.refresh(callback.stream_id)
            if callback.msgtype in ("text", "voice", "mixed", "image", "file", "video"):
                return await self.accept(callback)
            if callback.msgtype == "event":
                return await self.on_event(callback)
        except StoreError as exc:
            self.deps.metrics.store_errors.inc()
            log.error("bot %s: store unavailable while handling %s: %s", self.bot.key, callback.msgtype, exc)
            if callback.msgtype == "stream":
                # Keep WeCom polling with what it already showed: the answer may still arrive.
                shown = self._shown.get(callback.stream_id) or self.bot.placeholder
                return stream_reply(callback.stream_id, shown, finish=False)
            if callback.msgtype == "event":
                return None
            return stream_reply(new_id(), texts.BUSY, finish=True)
        return stream_reply(new_id(), texts.UNSUPPORTED, finish=True)

    async def accept(self, callback: Callback) -> dict[str, Any]:
        """Record a new message, start its relay and return the first stream reply, without waiting on Dify."""
        deps = self.deps
        sid = new_id()
        inbound = read_message(callback, self.bot)
        if inbound.refusal:
            return stream_reply(sid, inbound.refusal, finish=True)
        if not inbound.text and not inbound.media:
            return stream_reply(sid, texts.EMPTY, finish=True)
        winner = await deps.stores.dedupe.claim(self.bot.key, callback.msgid, sid, deps.config.msgid_ttl)
        if winner != sid:
            # WeCom delivered the callback again (maybe to another process): same stream, no second Dify call.
            log.info("bot %s: duplicate msgid, stream %s", self.bot.key, winner)
            return await self.refresh(winner, duplicate=True)
        scope = deps.scope_of(callback.userid, callback.chatid)
        if inbound.command:
            return await self._closed(sid, callback, await self.command(inbound.command, callback, scope))
        if deps.auth is not None:
            # Known staff only: refuse before anything is sent to Dify.
            try:
                await deps.auth.resolve(self.bot, callback.userid)
            except NotAuthorized:
                return await self._closed(sid, callback, self.bot.denied_text)
            except AuthUnavailable:
                return await self._closed(sid, callback, texts.SIGN_IN_FAILED)
        if not inbound.text:
            # Media alone waits for the user's next text (WeCom's URLs stay valid for 5 minutes).
            hold = min(deps.config.media_hold_seconds, 290.0)
            for item in inbound.media:
                await deps.media.add(self.bot.key, scope, item, hold)
            return await self._closed(sid, callback, texts.MEDIA_HELD)
        media = [*await deps.media.take(self.bot.key, scope), *inbound.media]
        session = self._session(sid, callback, scope, inbound.text,
                                {"media": json.dumps(media)} if media else {})
        await deps.stores.streams.create(session, deps.config.stream_ttl)
        if not await deps.turns.inflight.acquire(self.bot.key, callback.userid, sid, MAX_IN_FLIGHT,
                                                 deps.config.stream_window, session.created):
            await deps.stores.streams.finish(sid, session.owner, DONE, texts.TOO_MANY, {}, session.created)
            return stream_reply(sid, texts.TOO_MANY, finish=True)
        if deps.tasks.draining:
            # Shutting down: leave it unowned, so the first poll on another process takes it at once.
            await deps.stores.streams.release(sid, session.owner)
        else:
            deps.tasks.spawn(self.relay.run(session), name=f"relay-{sid}")
        if deps.config.log_content:
            log.info("bot %s: stream %s for %s: %s", self.bot.key, sid, callback.userid, inbound.text)
        else:
            log.info("bot %s: stream %s started for a %s chat", self.bot.key, sid, callback.chattype)
        return stream_reply(sid, self.bot.placeholder, finish=False, feedback_id=sid)

    def _session(self, sid: str, callback: Callback, scope: str, query: str,
                 extra: Mapping[str, str]) -> StreamSession:
        """A new session owned by this process, inside WeCom's polling window from now."""
        now = self.deps.clock()
        return StreamSession(sid=sid, bot=self.bot.key, user=callback.userid, chat=callback.chatid, query=query,
                             scope=scope, response_url=callback.response_url, owner=self.deps.config.node,
                             created=now, deadline=now + self.deps.config.stream_window, heartbeat=now, extra=extra)

    async def _closed(self, sid: str, callback: Callback, text: str) -> dict[str, Any]:
        """Reply ``text`` and finish at once, recorded so a redelivery of the callback gets the same reply."""
        session = self._session(sid, callback, "", "", {})
        await self.deps.stores.streams.create(session, self.deps.config.msgid_ttl)
        await self.deps.stores.streams.finish(sid, session.owner, DONE, text, {}, session.created)
        return stream_reply(sid, text, finish=True)

    async def command(self, command: str, callback: Callback, scope: str) -> str:
        """Carry out /new, /stop or /help; the short reply text."""
        deps = self.deps
        if command == HELP:
            return help_text(self.bot)
        if command == NEW:
            conversation_id = await deps.stores.conversations.get(self.bot.key, scope)
            await deps.stores.conversations.delete(self.bot.key, scope)
            if conversation_id:
                user = deps.dify_user(callback.userid, callback.chatid)
                deps.tasks.spawn(self._forget(conversation_id, user), name=f"forget-{conversation_id}")
            return texts.NEW_CONVERSATION
        assert command == STOP
        sid = await deps.turns.turns.head(self.bot.key, scope)
        session = await deps.stores.streams.get(sid) if sid else None
        if session is None or session.status not in ("queued", "streaming"):
            return texts.NOTHING_TO_STOP
        await deps.stores.streams.annotate(session.sid, {"stop": "1"})
        if session.task_id:
            deps.tasks.spawn(self._stop(session), name=f"stop-{session.sid}")
        return texts.STOPPED

    async def _stop(self, session: StreamSession) -> None:
        """Ask Dify to stop generating; its stream then ends normally with what was generated."""
        try:
            bearer = await self.deps.bearer(session.user)
            mode = session.extra.get("mode", "chat")
            await self.deps.dify.stop(session.task_id, self.deps.dify_user(session.user, session.chat), mode, bearer)
        except LaibaoError as exc:
            log.warning("stream %s: Dify stop failed: %s", session.sid, exc)

    async def _forget(self, conversation_id: str, user: str) -> None:
        try:
            await self.deps.dify.delete_conversation(conversation_id, user)
        except DifyError as exc:
            log.info("could not delete a Dify conversation (it is forgotten here anyway): %s", exc)

    async def refresh(self, sid: str, duplicate: bool = False) -> dict[str, Any]:
        """Answer a refresh poll with the cumulative snapshot; finish once the final content is in it."""
        deps = self.deps
        snapshot = await deps.stores.streams.poll(sid, self.bot.key)
        if snapshot is None:
            if duplicate:
                # The first delivery is being set up on another process right now.
                return stream_reply(sid, self.bot.placeholder, finish=False)
            return stream_reply(sid, texts.EXPIRED, finish=True)
        if not snapshot.finished and not deps.tasks.draining and self._orphaned(snapshot):
            await self._take_over(sid, snapshot.owner)
        content = self.render(snapshot)
        self._remember(sid, content, snapshot.finished)
        reply = stream_reply(sid, content, finish=snapshot.finished)
        if snapshot.items:  # generated images go on the finishing reply only
            reply["stream"]["msg_item"] = json.loads(snapshot.items)
        return reply

    def render(self, snapshot: Snapshot) -> str:
        """What WeCom shows: reasoning as <think> or hidden, cut to 20480 UTF-8 bytes."""
        shown, _ = render_answer(snapshot.content, self.bot.think, final=snapshot.finished)
        return shown or self.bot.placeholder

    def _remember(self, sid: str, content: str, finished: bool) -> None:
        if finished:
            self._shown.pop(sid, None)
        else:
            self._shown[sid] = content

    def _orphaned(self, snapshot: Snapshot) -> bool:
        return snapshot.owner == "" or self.deps.clock() - snapshot.heartbeat > self.deps.config.lease

    async def _take_over(self, sid: str, previous_owner: str) -> None:
        """Adopt a session whose relay died (stale heartbeat) or was released; one process wins."""
        deps = self.deps
        if not await deps.stores.streams.take_over(sid, deps.config.node, deps.clock(), deps.config.lease):
            return
        session = await deps.stores.streams.get(sid)
        if session is None:
            return
        deps.metrics.takeovers.labels(self.bot.key).inc()
        log.warning("bot %s: took over stream %s from %s", self.bot.key, sid, previous_owner or "(released)")
        deps.tasks.spawn(self.relay.run(session, takeover=True), name=f"relay-{sid}")

    async def on_event(self, callback: Callback) -> dict[str, Any] | None:
        """enter_chat gets a welcome; feedback goes to Dify in the background; other events get nothing."""
        if callback.event_type == "enter_chat":
            return text_reply(await self.welcome())
        if callback.event_type == "feedback_event":
            event = callback.raw.get("event")
            feedback = event.get("feedback_event") if isinstance(event, Mapping) else None
            if isinstance(feedback, Mapping):
                self.deps.tasks.spawn(self._feedback(feedback), name="feedback")
        return None

    async def welcome(self) -> str:
        """The configured welcome, else Dify's opening statement and suggested questions, else a default."""
        if self.bot.welcome:
            return self.bot.welcome
        try:
            parameters = await asyncio.wait_for(self.relay.parameters(), WELCOME_TIMEOUT)
        except (DifyError, TimeoutError) as exc:
            log.info("bot %s: no opening statement from Dify: %s", self.bot.key, exc)
            return texts.WELCOME
        opening = str(parameters.get("opening_statement") or "").strip()
        questions = [q for q in parameters.get("suggested_questions") or [] if isinstance(q, str) and q.strip()]
        lines = [opening or texts.WELCOME]
        if questions:
            lines.append("你可以这样问：")
            lines.extend(f"- {q.strip()}" for q in questions)
        return "\n".join(lines)

    async def _feedback(self, feedback: Mapping[str, Any]) -> None:
        """Forward a rating to Dify for the answered message (feedback id = our stream id)."""
        sid = feedback.get("id")
        kind = feedback.get("type")
        try:
            session = await self.deps.stores.streams.get(sid) if isinstance(sid, str) else None
            if session is None or not session.message_id:
                log.info("feedback for an unknown or unfinished stream ignored")
                return
            rating = {1: "like", 2: "dislike"}.get(kind) if isinstance(kind, int) else None
            reasons = [REASONS[r] for r in feedback.get("inaccurate_reason_list") or [] if r in REASONS]
            text = str(feedback.get("content") or "").strip()
            content = "；".join([*reasons, text] if text else reasons) if rating == "dislike" else ""
            bearer = await self.deps.bearer(session.user)
            user = self.deps.dify_user(session.user, session.chat)
            await self.deps.dify.feedback(session.message_id, rating, user, content, bearer)
        except LaibaoError as exc:
            log.warning("feedback not forwarded to Dify: %s", exc)
