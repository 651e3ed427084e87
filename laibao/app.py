"""The Tornado application factory and the `serve` loop."""

from __future__ import annotations

import asyncio
import logging
import signal

import tornado.httpserver
import tornado.web

from handlers.api import SendHandler
from handlers.callback import CallbackHandler
from handlers.health import HealthHandler, MetricsHandler, ReadyHandler
from laibao.config import Config
from laibao.runtime import Runtime

log = logging.getLogger("laibao.app")


def make_app(runtime: Runtime) -> tornado.web.Application:
    """Routes for every configured bot plus the health endpoints."""
    return tornado.web.Application(
        [
            (r"/wecom/callback", CallbackHandler),
            (r"/wecom/callback/([A-Za-z0-9_-]{1,64})", CallbackHandler),
            (r"/healthz", HealthHandler),
            (r"/readyz", ReadyHandler),
            (r"/metrics", MetricsHandler),
            (r"/api/send", SendHandler),
        ],
        runtime=runtime,
        # Error pages are plain text from BaseHandler.write_error; no tracebacks, even in debug.
        serve_traceback=False,
    )


def configure_logging(level: str) -> None:
    """One line per record on stderr, as supervisord collects it."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def serve(config: Config) -> None:
    """Run the service until SIGTERM/SIGINT, then drain relays and close."""
    runtime = Runtime.build(config)
    await runtime.start()
    app = make_app(runtime)
    # The handler refuses bodies over max_body_bytes with 413; the server limit only stops abuse.
    server = tornado.httpserver.HTTPServer(app, max_body_size=max(config.max_body_bytes * 8, 8 << 20))
    server.listen(config.port, address=config.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bots = ", ".join(f"{bot.key} (websocket)" if bot.websocket else bot.path for bot in config.bots)
    log.info("laibao %s listening on %s:%d, bots at %s, store %s", config.node, config.host, config.port,
             bots, "redis" if config.redis_url else "in-process")
    await stop.wait()
    # The WeCom long connections go first: another process takes them over without waiting for the lease.
    await runtime.ws.stop()
    log.info("draining: %d relays get %.0f s to finish", len(runtime.tasks), config.shutdown_grace)
    # Draining: /readyz answers 503, so the load balancer stops sending traffic, while polls that still
    # arrive are answered; new messages are recorded unowned and taken by the first other process polled.
    released = await runtime.tasks.drain(config.shutdown_grace)
    server.stop()
    log.info("stopped accepting; %d unfinished relays released to other processes", released)
    await runtime.close()
    await server.close_all_connections()
    log.info("stopped")
