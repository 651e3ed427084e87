"""The Tornado application factory and the `serve` loop."""

from __future__ import annotations

import asyncio
import logging
import signal

import tornado.httpserver
import tornado.web
from tornado.log import access_log

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
        ],
        runtime=runtime,
        # Error pages are plain text from BaseHandler.write_error; no tracebacks, even in debug.
        serve_traceback=False,
        log_function=log_request,
    )


def log_request(handler: tornado.web.RequestHandler) -> None:
    """One access line per request: at DEBUG when it succeeded (every poll is one), louder when not."""
    status = handler.get_status()
    level = logging.DEBUG if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if access_log.isEnabledFor(level):
        request = handler.request
        access_log.log(level, "%d %s %s %.1f ms", status, request.method, request.path,
                       1000.0 * request.request_time())


def configure_logging(level: str) -> None:
    """One line per record on stderr, as supervisord collects it."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_serve(config: Config) -> None:
    """Run ``serve`` on the configured event loop (uvloop: less CPU per request than asyncio's own)."""
    factory = None
    if config.event_loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(config))


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
    bots = ", ".join(bot.path for bot in config.bots)
    log.info("laibao %s listening on %s:%d, bots at %s, store %s", config.node, config.host, config.port,
             bots, "redis" if config.redis_url else "in-process")
    await stop.wait()
    log.info("draining: %d relays get %.0f s to finish", len(runtime.tasks), config.shutdown_grace)
    # Draining: /readyz answers 503, so the load balancer stops sending traffic, while polls that still
    # arrive are answered; new messages are recorded unowned and taken by the first other process polled.
    released = await runtime.tasks.drain(config.shutdown_grace)
    server.stop()
    log.info("stopped accepting; %d unfinished relays released to other processes", released)
    await runtime.close()
    await server.close_all_connections()
    log.info("stopped")
