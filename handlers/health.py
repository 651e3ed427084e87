"""Liveness and readiness for the load balancer and supervisord."""

from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST

from handlers.base import BaseHandler

log = logging.getLogger("laibao.health")


class HealthHandler(BaseHandler):
    """GET /healthz: the process answers."""

    def get(self) -> None:
        """Always ok while the event loop runs."""
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("ok\n")


class ReadyHandler(BaseHandler):
    """GET /readyz: 200 when every configured backend answers, else 503 naming what failed."""

    async def get(self) -> None:
        """Ask the runtime which parts fail; the body names them, the reasons (hosts, ports) go to the log."""
        failures = await self.runtime.readiness()
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        if failures:
            for part, why in failures.items():
                log.warning("not ready: %s: %s", part, why)
            self.set_status(503)
            self.finish("".join(f"{part}: {'draining' if part == 'process' else 'unavailable'}\n"
                                for part in failures))
        else:
            self.finish("ready\n")


class MetricsHandler(BaseHandler):
    """GET /metrics: Prometheus text exposition."""

    def get(self) -> None:
        """Render this process's registry."""
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.runtime.metrics.render())
