"""The services of one process, built once at start-up and closed on shutdown."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tornado.httpclient import AsyncHTTPClient

from laibao.auth import AuthService
from laibao.config import BotConfig, Config
from laibao.crypto import WeComCrypto
from laibao.dify import DifyClient
from laibao.errors import StoreError
from laibao.longconn import LongConnections, unused_crypto
from laibao.metrics import Metrics
from laibao.relay import BotDeps, RelayTasks
from laibao.service import BotService
from stores import Stores, open_stores
from stores.media_store import MediaHold, MemoryMediaHold, RedisMediaHold
from stores.redis_store import RedisStores
from stores.tokens import open_token_cache
from stores.turns_store import MemoryTurns, RedisTurns, Turns, session_status
from stores.users import open_user_store
from stores.ws_store import MemoryWsStore, RedisWsStore

log = logging.getLogger("laibao.runtime")


@dataclass(frozen=True)
class BotRuntime:
    """One configured bot: its crypto and its service."""

    config: BotConfig
    crypto: WeComCrypto
    service: BotService


class Runtime:
    """Everything a handler may reach: configuration, stores, bots and their running relays."""

    def __init__(self, config: Config, stores: Stores, http: AsyncHTTPClient) -> None:
        self.config = config
        self.stores = stores
        self.http = http
        self.tasks = RelayTasks()
        self.metrics = Metrics()
        turns: Turns
        media: MediaHold
        if isinstance(stores, RedisStores):
            turns, media = RedisTurns(stores.client), RedisMediaHold(stores.client)
        else:
            turns, media = MemoryTurns(session_status(stores.streams)), MemoryMediaHold()
        # The user store and token cache are only opened when a bot checks who may talk to it.
        self.auth: AuthService | None = None
        if any(bot.auth != "open" for bot in config.bots):
            self.auth = AuthService(config, open_user_store(config), open_token_cache(config), http)
            self.metrics.add_counters("laibao_auth_resolutions", "User resolutions by cache level and outcome",
                                      "level", self.auth.stats)
        self.bots: dict[str, BotRuntime] = {}
        for bot in config.bots:
            dify = DifyClient(
                bot.dify_url,
                bot.dify_key,
                http=http,
                connect_timeout=config.dify_connect_timeout,
                idle_timeout=config.dify_idle_timeout,
                total_timeout=config.dify_total_timeout,
            )
            crypto = WeComCrypto(bot.token, bot.aes_key, bot.receive_id) if not bot.websocket else unused_crypto()
            deps = BotDeps(bot=bot, stores=stores, turns=turns, media=media, dify=dify, http=http, crypto=crypto,
                           config=config, tasks=self.tasks, metrics=self.metrics,
                           auth=self.auth if bot.auth != "open" else None)
            self.bots[bot.name] = BotRuntime(bot, crypto, BotService(deps))
        # Long-connection bots: one process of the cluster holds each one's WeCom connection.
        ws_store = RedisWsStore(stores.client) if isinstance(stores, RedisStores) else MemoryWsStore()
        self.ws = LongConnections(config, {name: bot.service for name, bot in self.bots.items()}, ws_store,
                                  self.metrics.registry)

    @classmethod
    def build(cls, config: Config) -> Runtime:
        """Open the stores and the shared HTTP client (must run inside the event loop)."""
        # Each live answer holds one HTTP connection to Dify: the default of 10 would queue answers.
        http = AsyncHTTPClient(force_instance=True, max_clients=config.http_max_clients)
        return cls(config, open_stores(config.redis_url or None), http)

    async def start(self) -> None:
        """Start background listeners (token invalidations from other processes)."""
        if self.auth is not None:
            await self.auth.start()
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
        cancelled = await self.tasks.drain(grace)
        if cancelled:
            log.warning("%d relays were still running at shutdown", cancelled)
        if self.auth is not None:
            await self.auth.close()
        await self.stores.close()
        self.http.close()
