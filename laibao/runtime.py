"""The services of one process, built once at start-up and closed on shutdown."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tornado.httpclient import AsyncHTTPClient

from laibao.config import BotConfig, Config
from laibao.crypto import WeComCrypto
from laibao.dify import DifyClient
from laibao.errors import StoreError
from laibao.metrics import Metrics
from laibao.relay import BotService, RelaySettings, RelayTasks
from stores import Stores, open_stores

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
        settings = RelaySettings.from_config(config)
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
            crypto = WeComCrypto(bot.token, bot.aes_key, bot.receive_id)
            service = BotService(bot, stores, dify, settings, self.tasks, self.metrics)
            self.bots[bot.name] = BotRuntime(bot, crypto, service)

    @classmethod
    def build(cls, config: Config) -> Runtime:
        """Open the stores and the shared HTTP client (must run inside the event loop)."""
        # Each live answer holds one HTTP connection to Dify: the default of 10 would queue answers.
        http = AsyncHTTPClient(force_instance=True, max_clients=config.http_max_clients)
        return cls(config, open_stores(config.redis_url or None), http)

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
        return failures

    async def close(self, grace: float = 0.0) -> None:
        """Let relays finish for up to ``grace`` seconds, then close the clients."""
        cancelled = await self.tasks.drain(grace)
        if cancelled:
            log.warning("%d relays were still running at shutdown", cancelled)
        await self.stores.close()
        self.http.close()
