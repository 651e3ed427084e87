"""The services of one process, built once at start-up and closed on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from laibao.answer.budget import ByteBudget
from laibao.answer.difyapp import DifyApp
from laibao.answer.job import Answers, WeComFiles
from laibao.answer.outbox import Outbox
from laibao.answer.tasks import AnswerTasks
from laibao.answer.writer import Flusher
from laibao.auth import AuthService
from laibao.config import BotConfig, Config
from laibao.crypto import WeComCrypto
from laibao.dify import DifyClient
from laibao.errors import StoreError
from laibao.longconn import LongConnections, unused_crypto
from laibao.metrics import Metrics
from laibao.outbound import Outbound
from laibao.service import BotService
from stores import Stores, open_stores
from stores.media_store import MediaHold, MemoryMediaHold, RedisMediaHold
from stores.redis_store import RedisStores
from stores.relay_store import MemoryRelayState, RedisRelayState, RelayState
from stores.tokens import open_token_cache
from stores.turns_store import MemoryTurns, RedisTurns, Turns, session_status
from stores.users import open_user_store
from stores.ws_store import MemoryWsStore, RedisWsStore, WsStore

log = logging.getLogger("laibao.runtime")


@dataclass(frozen=True)
class BotRuntime:
    """One configured bot: its crypto and its service."""

    config: BotConfig
    crypto: WeComCrypto
    service: BotService


class Runtime:
    """Everything a handler may reach: configuration, stores, bots and their running relays."""

    def __init__(self, config: Config, stores: Stores, http: Outbound) -> None:
        self.config = config
        self.stores = stores
        self.http = http
        self.tasks = AnswerTasks(config.max_relays)
        self.metrics = Metrics()
        self.metrics.max_relays.set(config.max_relays)
        # One writer for the answer text of every stream on this process (group commit per tick).
        self.flusher = Flusher(stores.streams, config.flush_interval, config.flush_bytes)
        turns: Turns
        media: MediaHold
        relay: RelayState
        if isinstance(stores, RedisStores):
            turns = RedisTurns(stores.client, stores.keys, lease=config.lease)
            media = RedisMediaHold(stores.client, stores.keys)
            relay = RedisRelayState(stores.client, stores.keys)
        else:
            turns = MemoryTurns(session_status(stores.streams), lease=config.lease)
            media, relay = MemoryMediaHold(), MemoryRelayState(stores.streams)
        self.turns = turns
        self.relay = relay
        # response_url deliveries: by their relay at once, or swept up here if its process died.
        self.outbox = Outbox(relay, stores.streams, http, node=config.node, lease=config.lease,
                             retries=config.response_url_retries)
        self._sweeper: asyncio.Task[None] | None = None
        media_budget = ByteBudget(config.media_memory_bytes)
        # The user store and token cache are only opened when a bot checks who may talk to it.
        self.auth: AuthService | None = None
        if any(bot.auth != "open" for bot in config.bots):
            self.auth = AuthService(config, open_user_store(config), open_token_cache(config), http)
            self.metrics.add_counters("laibao_auth_resolutions", "User resolutions by cache level and outcome",
                                      "level", self.auth.stats)
            self.metrics.add_counters("laibao_auth_admissions", "Callback-path admissions by how they were decided",
                                      "outcome", self.auth.admissions)
        self.bots: dict[str, BotRuntime] = {}
        for bot in config.bots:
            dify = DifyClient(
                bot.dify_url,
                bot.dify_key,
                http=http,
                connect_timeout=config.dify_connect_timeout,
                idle_timeout=config.dify_idle_timeout,
                total_timeout=config.dify_total_timeout,
                file_hosts=config.dify_file_hosts,
            )
            crypto = WeComCrypto(bot.token, bot.aes_key, bot.receive_id) if not bot.websocket else unused_crypto()
            app = DifyApp(bot, dify, self.auth if bot.auth != "open" else None)
            files = WeComFiles(http, crypto, config.media_max_bytes, config.response_url_retries, media_budget,
                               config.media_deadline)
            answers = Answers(bot=bot, app=app, streams=stores.streams, conversations=stores.conversations,
                              turns=turns.turns, inflight=turns.inflight, files=files, flusher=self.flusher,
                              tasks=self.tasks, metrics=self.metrics, config=config, relay=relay,
                              outbox=self.outbox)
            service = BotService(bot=bot, config=config, app=app, answers=answers, stores=stores, turns=turns.turns,
                                 inflight=turns.inflight, media=media, tasks=self.tasks, metrics=self.metrics)
            self.bots[bot.name] = BotRuntime(bot, crypto, service)
        # Long-connection bots: one process of the cluster holds each one's WeCom connection.
        ws_store: WsStore = MemoryWsStore()
        if isinstance(stores, RedisStores):
            ws_store = RedisWsStore(stores.client, stores.keys.prefix)
        self.ws = LongConnections(config, {name: bot.service for name, bot in self.bots.items()}, ws_store,
                                  self.metrics.registry)

    @classmethod
    def build(cls, config: Config) -> Runtime:
        """Open the stores and the shared HTTP clients (must run inside the event loop)."""
        stores = open_stores(config.redis_url or None, prefix=config.redis_prefix,
                             sentinel_password=config.redis_sentinel_password or None,
                             pool_size=config.redis_pool_size, pool_timeout=config.redis_pool_timeout)
        return cls(config, stores, Outbound.from_config(config))

    async def start(self) -> None:
        """Start background listeners (token invalidations from other processes)."""
        if self.auth is not None:
            await self.auth.start()
        self._sweeper = asyncio.get_running_loop().create_task(self.outbox.run(self.config.delivery_sweep),
                                                               name="delivery-sweep")
        self.ws.start()

    @property
    def draining(self) -> bool:
        """True once shutdown started: the load balancer should stop sending traffic here."""
        return self.tasks.draining

    async def readiness(self) -> dict[str, str]:
        """The backends that do not answer, each with a short reason (empty when ready)."""
        failures: dict[str, str] = {}
        if self.draining:
            failures["process"] = "draining (shutting down)"
        try:
            await self.stores.ping()
        except StoreError as exc:
            failures["redis"] = str(exc) or "unreachable"
        if self.auth is not None and self.config.mysql_url:
            try:
                await self.auth.users.ping()
            except StoreError as exc:
                failures["mysql"] = str(exc) or "unreachable"
        return failures

    async def close(self, grace: float = 0.0) -> None:
        """Let relays finish for up to ``grace`` seconds, then close the clients."""
        await self.ws.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        cancelled = await self.tasks.drain(grace)
        if cancelled:
            log.warning("%d relays were still running at shutdown", cancelled)
        await self.flusher.close()
        if self.auth is not None:
            await self.auth.close()
        await self.stores.close()
        self.http.close()
