"""One bot's answer to every callback: messages, commands, refresh polls and events.

Nothing here waits for Dify's answer: ``accept`` records the session, starts the relay task and
answers at once; any process answers a refresh poll from the shared store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from cachetools import LRUCache

from laibao import texts
from laibao.answer.difyapp import DifyApp
from laibao.answer.job import COMMAND_FIELD, Answers
from laibao.answer.render import new_id, render_answer
from laibao.answer.tasks import AnswerTasks
from laibao.commands import HELP, NEW, STOP, Inbound, help_text, read_message
from laibao.config import BotConfig, Config
from laibao.dify import DifyClient
from laibao.errors import AuthError, DifyError, LaibaoError, StoreError
from laibao.metrics import Metrics
from laibao.wecom import Callback, Feedback, stream_reply, text_reply
from stores.base import DONE, Snapshot, Stores, StreamSession
from stores.keys import new_sid
from stores.media_store import MediaHold
from stores.turns_store import InFlight, TurnQueue

log = logging.getLogger("laibao.service")

SHOWN_CACHE_SIZE = 10000
MAX_IN_FLIGHT = 3  # WeCom's own limit of one user's messages being answered at once
WELCOME_TIMEOUT = 2.0  # enter_chat must be answered at once: Dify's opening statement or the default
# feedback_event reasons (WeCom's codes) as the text Dify stores with a dislike
REASONS = {1: "答非所问", 2: "回答不完整", 3: "回答有误", 4: "数据分析有误"}


class BotService:
    """Everything one bot does with a callback."""

    def __init__(self, *, bot: BotConfig, config: Config, app: DifyApp, answers: Answers, stores: Stores,
                 turns: TurnQueue, inflight: InFlight, media: MediaHold, tasks: AnswerTasks, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.bot = bot
        self.config = config
        self.app = app
        self.answers = answers
        self.streams = stores.streams
        self.dedupe = stores.dedupe
        self.conversations = stores.conversations
        self.turns = turns
        self.inflight = inflight
        self.media = media
        self.tasks = tasks
        self.metrics = metrics
        self.clock = clock
        answers.resume_command = self._run_command  # a deferred command taken over from a dead process
        # The last content each stream showed, so a poll during a store outage never shows less.
        self._shown: LRUCache[str, str] = LRUCache(maxsize=SHOWN_CACHE_SIZE)
        # Per rated stream, the last rating on its way to Dify: the next one waits for it, so Dify keeps
        # the user's last click (like, then cancel) and not whichever request happened to land last.
        self._ratings: dict[str, asyncio.Task[None]] = {}

    @property
    def dify(self) -> DifyClient:
        """The bot's Dify client."""
        return self.app.client

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
            self.metrics.store_errors.inc()
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
        """Record a new message, start its answer and return the first stream reply, without waiting on Dify."""
        scope = self.app.scope_of(callback.userid, callback.chatid)
        # the id carries its scope's hash tag: on a cluster the session shares the slot of its turns
        sid = new_sid(self.bot.key, scope)
        inbound = read_message(callback, self.bot)
        if inbound.refusal:
            return stream_reply(sid, inbound.refusal, finish=True)
        if not inbound.text and not inbound.media:
            return stream_reply(sid, texts.EMPTY, finish=True)
        sender = (self.bot.key, callback.userid, callback.chatid, callback.msgid)
        winner = await self.dedupe.claim(*sender, sid, self.config.msgid_ttl)
        if winner != sid:
            # WeCom delivered the callback again (maybe to another process): same stream, no second Dify call.
            log.info("bot %s: duplicate msgid, stream %s", self.bot.key, winner)
            return await self.refresh(winner, duplicate=True)
        try:
            return await self._accept_claimed(sid, scope, callback, inbound)
        except StoreError:
            # Nothing answers this message: free its msgid, so WeCom's redelivery gets a real answer
            # instead of a stream id that leads nowhere.
            try:
                await self.dedupe.unclaim(*sender, sid)
            except StoreError as exc:
                log.error("bot %s: could not free the msgid of a message that failed: %s", self.bot.key, exc)
            raise

    async def _accept_claimed(self, sid: str, scope: str, callback: Callback, inbound: Inbound) -> dict[str, Any]:
        text, media_in, command = inbound.text, inbound.media, inbound.command
        # Known staff only, commands included. Decided from laibao's own stores within a short bound;
        # the sign-in (the auth service) happens in the answer job, never on this path.
        admitted = await self._admit(callback.userid)
        if admitted is False:
            return await self._closed(sid, callback, self.bot.denied_text)
        if command:
            if admitted is None:
                return await self._defer_command(sid, callback, scope, command)
            return await self._closed(sid, callback, await self.command(command, callback.userid, callback.chatid,
                                                                         scope))
        if not text:
            # Media alone waits for the user's next text (WeCom's URLs stay valid for 5 minutes).
            hold = min(self.config.media_hold_seconds, 290.0)
            for item in media_in:
                await self.media.add(self.bot.key, scope, item, hold)
            return await self._closed(sid, callback, texts.MEDIA_HELD)
        media = [*await self.media.take(self.bot.key, scope), *media_in]
        session = self._session(sid, callback, scope, text, {"media": json.dumps(media)} if media else {})
        await self.streams.create(session, self.config.stream_ttl)
        # A slot lasts as long as the relay can (not WeCom's window): the relay's end frees it sooner.
        if not await self.inflight.acquire(self.bot.key, callback.userid, sid, MAX_IN_FLIGHT,
                                           self.config.stream_ttl, session.created):
            await self.streams.finish(sid, session.owner, DONE, texts.TOO_MANY, {}, session.created)
            return stream_reply(sid, texts.TOO_MANY, finish=True)
        if not self.answers.start(session):
            # Draining or at LAIBAO_MAX_RELAYS: leave it unowned, so the first poll on a process with
            # room takes it at once. A failure here rolls the claim back (the session stays orphaned).
            await self.streams.release(sid, session.owner)
        if self.config.log_content:
            log.info("bot %s: stream %s for %s: %s", self.bot.key, sid, callback.userid, text)
        else:
            log.info("bot %s: stream %s started for a %s chat", self.bot.key, sid, callback.chattype)
        return stream_reply(sid, self.bot.placeholder, finish=False, feedback_id=sid)

    def _session(self, sid: str, callback: Callback, scope: str, query: str,
                 extra: Mapping[str, str]) -> StreamSession:
        """A new session owned by this process, inside WeCom's polling window from now."""
        now = self.clock()
        return StreamSession(sid=sid, bot=self.bot.key, user=callback.userid, chat=callback.chatid, query=query,
                             scope=scope, response_url=callback.response_url, owner=self.config.node,
                             created=now, deadline=now + self.config.stream_window, heartbeat=now, extra=extra)

    async def _closed(self, sid: str, callback: Callback, text: str) -> dict[str, Any]:
        """Reply ``text`` and finish at once, recorded so a redelivery of the callback gets the same reply."""
        session = self._session(sid, callback, "", "", {})
        await self.streams.create(session, self.config.msgid_ttl)
        await self.streams.finish(sid, session.owner, DONE, text, {}, session.created)
        return stream_reply(sid, text, finish=True)

    async def _admit(self, userid: str) -> bool | None:
        """May the user use this bot: True, False, or None when not known yet (decided later)."""
        if self.app.auth is None:
            return True
        return await self.app.auth.admit(self.bot, userid)

    async def _defer_command(self, sid: str, callback: Callback, scope: str, command: str) -> dict[str, Any]:
        """A command from a user not yet known to be allowed: reply now, decide and carry it out in the
        background, and show the outcome on the next poll."""
        session = self._session(sid, callback, scope, "", {COMMAND_FIELD: command})
        await self.streams.create(session, self.config.msgid_ttl)
        self.tasks.spawn(self._run_command(session), name=f"command-{sid}")
        return stream_reply(sid, self.bot.placeholder, finish=False)

    async def _run_command(self, session: StreamSession) -> None:
        """Decide whether the user may give the deferred command, carry it out, finish its stream."""
        try:
            if self.app.auth is not None and not await self.app.auth.decide(self.bot, session.user):
                text = self.bot.denied_text
            else:
                text = await self.command(session.extra[COMMAND_FIELD], session.user, session.chat, session.scope)
        except AuthError:
            text = texts.SIGN_IN_FAILED
        except StoreError as exc:
            log.warning("stream %s: a deferred command failed: %s", session.sid, exc)
            text = texts.BUSY
        try:
            await self.streams.finish(session.sid, self.config.node, DONE, text, {}, self.clock())
        except StoreError as exc:
            # The session stays running: the first poll after the lease carries the command out again.
            log.error("stream %s: could not record a command's outcome: %s", session.sid, exc)

    async def command(self, command: str, userid: str, chatid: str, scope: str) -> str:
        """Carry out /new, /stop or /help for an allowed user; the short reply text."""
        if command == HELP:
            return help_text(self.bot)
        if command == NEW:
            conversation_id = await self.conversations.get(self.bot.key, scope)
            await self.conversations.delete(self.bot.key, scope)
            if conversation_id:
                user = self.app.dify_user(userid, chatid)
                self.tasks.spawn(self._forget(conversation_id, user), name=f"forget-{conversation_id}")
            return texts.NEW_CONVERSATION
        assert command == STOP
        sid = await self.turns.head(self.bot.key, scope)
        session = await self.streams.get(sid) if sid else None
        if session is None or session.status not in ("queued", "streaming"):
            return texts.NOTHING_TO_STOP
        await self.streams.annotate(session.sid, {"stop": "1"})
        if session.task_id:
            self.tasks.spawn(self._stop(session), name=f"stop-{session.sid}")
        return texts.STOPPED

    async def _stop(self, session: StreamSession) -> None:
        """Ask Dify to stop generating; its stream then ends normally with what was generated."""
        try:
            bearer = await self.app.bearer(session.user)
            mode = session.extra.get("mode", "chat")
            await self.dify.stop(session.task_id, self.app.dify_user(session.user, session.chat), mode, bearer)
        except LaibaoError as exc:
            log.warning("stream %s: Dify stop failed: %s", session.sid, exc)

    async def _forget(self, conversation_id: str, user: str) -> None:
        try:
            await self.dify.delete_conversation(conversation_id, user)
        except DifyError as exc:
            log.info("could not delete a Dify conversation (it is forgotten here anyway): %s", exc)

    async def refresh(self, sid: str, duplicate: bool = False) -> dict[str, Any]:
        """Answer a refresh poll with the cumulative snapshot; finish once the final content is in it."""
        snapshot = await self.streams.poll(sid, self.bot.key, self.clock())
        if snapshot is None:
            if duplicate:
                # The first delivery is being set up on another process right now.
                return stream_reply(sid, self.bot.placeholder, finish=False)
            return stream_reply(sid, texts.EXPIRED, finish=True)
        for lag in snapshot.lags:
            self.metrics.visible_lag.observe(max(0.0, lag))
        if not snapshot.finished and self._orphaned(snapshot):
            await self.answers.take_over(sid, snapshot.owner)
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
        return snapshot.owner == "" or self.clock() - snapshot.heartbeat > self.config.lease

    async def on_event(self, callback: Callback) -> dict[str, Any] | None:
        """enter_chat gets a welcome; feedback goes to Dify in the background; other events get nothing."""
        if callback.event_type == "enter_chat":
            if await self._admit(callback.userid) is False:
                return text_reply(self.bot.denied_text)
            return text_reply(await self.welcome())
        if callback.feedback is not None:
            self._rate(callback.feedback, callback.userid, callback.chatid)
        return None

    def _may_rate(self, session: StreamSession, userid: str, chatid: str) -> bool:
        """The answer's user, or any member of its group when the group shares one conversation."""
        if session.user == userid:
            return True
        return self.bot.group_scope == "chat" and bool(session.chat) and session.chat == chatid

    async def welcome(self) -> str:
        """The configured welcome, else Dify's opening statement and suggested questions, else a default."""
        if self.bot.welcome:
            return self.bot.welcome
        try:
            parameters = await asyncio.wait_for(self.app.parameters(), WELCOME_TIMEOUT)
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

    def _rate(self, feedback: Feedback, userid: str, chatid: str) -> None:
        """Forward a rating in the background, after the ratings of the same stream that came before it."""
        key = feedback.id
        previous = self._ratings.get(key)
        task = self.tasks.spawn(self._feedback_after(previous, feedback, userid, chatid), name="feedback")
        self._ratings[key] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._ratings.get(key) is done:
                del self._ratings[key]

        task.add_done_callback(forget)

    async def _feedback_after(self, previous: asyncio.Task[None] | None, feedback: Feedback,
                              userid: str, chatid: str) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # its outcome is its own: only the order matters here
        await self._feedback(feedback, userid, chatid)

    async def _feedback(self, feedback: Feedback, userid: str, chatid: str) -> None:
        """Forward a rating to Dify for the answered message (feedback id = our stream id).

        Only an allowed user may rate, and only an answer of theirs: their own, or in a group with one
        conversation per chat, any answer in that group.
        """
        try:
            session = await self.streams.get(feedback.id) if feedback.id else None
            if session is None or session.bot != self.bot.key or not session.message_id:
                log.info("feedback for an unknown or unfinished stream ignored")
                return
            if not self._may_rate(session, userid, chatid):
                log.warning("bot %s: feedback from %s on stream %s of another user ignored",
                            self.bot.key, userid, session.sid)
                return
            if self.app.auth is not None and not await self.app.auth.decide(self.bot, userid):
                log.warning("bot %s: feedback from %s, who may not use the bot, ignored", self.bot.key, userid)
                return
            rating = {1: "like", 2: "dislike"}.get(feedback.type) if feedback.type is not None else None
            reasons = [REASONS[r] for r in feedback.reasons if r in REASONS]
            text = feedback.content.strip()
            content = "；".join([*reasons, text] if text else reasons) if rating == "dislike" else ""
            bearer = await self.app.bearer(session.user)
            user = self.app.dify_user(session.user, session.chat)
            await self.dify.feedback(session.message_id, rating, user, content, bearer)
        except LaibaoError as exc:
            log.warning("feedback not forwarded to Dify: %s", exc)
