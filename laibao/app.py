"""The Tornado application factory and the `serve` loop."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import signal
from typing import TextIO

import tornado.httpserver
import tornado.web
from tornado.log import access_log

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
        log_function=log_request,
    )


def make_server(runtime: Runtime) -> tornado.httpserver.HTTPServer:
    """The HTTP server for ``make_app(runtime)``, with the limits that keep slow clients from piling up."""
    config = runtime.config
    return tornado.httpserver.HTTPServer(
        make_app(runtime),
        # The handler refuses bodies over max_body_bytes with 413; the server limit only stops abuse.
        max_body_size=max(config.max_body_bytes * 8, 8 << 20),
        # Without these a client sending half a request line, or half a body, holds its socket (and a
        # file descriptor Redis and Dify also need) for an hour, or for ever.
        idle_connection_timeout=config.idle_connection_timeout,
        body_timeout=config.body_timeout,
    )


_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


class OneLineFormatter(logging.Formatter):
    """Every record is one line: control characters (line breaks, escapes, lone surrogates) are escaped.

    Log arguments carry text from outside (a Dify error, a userid, an errcode): escaped here, once, a
    ``\\n`` in them cannot forge a record of its own, and a terminal escape cannot hide one.
    Tracebacks become one line too, with ``\\n`` between their lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as usual, then escaped."""
        text = super().format(record)
        # isprintable() is False for every character escaped here: most records skip the regex.
        return text if text.isprintable() else _UNSAFE.sub(_escape, text)


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """One line per record on stderr (or ``stream``), as supervisord collects it."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def log_request(handler: tornado.web.RequestHandler) -> None:
    """One access line per request: at DEBUG when it succeeded (every poll is one), louder when not."""
    status = handler.get_status()
    level = logging.DEBUG if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if access_log.isEnabledFor(level):
        request = handler.request
        access_log.log(level, "%d %s %s %.1f ms", status, request.method, request.path,
                       1000.0 * request.request_time())


def run_serve(config: Config) -> None:
    """Run ``serve`` on the configured event loop (uvloop: less CPU per request than asyncio's own)."""
    factory = None
    if config.event_loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(config))


# The cyclic GC's young-generation threshold while serving (CPython's default is 700; the older two keep
# theirs). Measured at 600 users (bench/scale.py): with the defaults each process ran about 150 young,
# 10 middle and 1-2 full collections per run, 200-350 ms in all, and every full collection stopped the
# event loop for 30-105 ms, polls included; with this threshold and the start-up objects frozen, 12-15
# young collections of 35-75 ms in all and no full one during the run, at the same peak RSS.
GC_YOUNG_THRESHOLD = 5000
GC_MIDDLE_THRESHOLD = 20


def tune_gc() -> None:
    """Freeze what start-up allocated (modules, settings, the app) and collect the young less often."""
    gc.collect()
    gc.freeze()  # long-lived: never worth scanning again, and not scanned by any later collection
    _, _, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, GC_MIDDLE_THRESHOLD, oldest)


async def serve(config: Config) -> None:
    """Run the service until SIGTERM/SIGINT, then drain relays and close."""
    runtime = Runtime.build(config)
    await runtime.start()
    server = make_server(runtime)
    server.listen(config.port, address=config.host)
    tune_gc()
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
    # A load balancer notices /readyz only at its next check: until then keep accepting, even when idle.
    released, _ = await asyncio.gather(runtime.tasks.drain(config.shutdown_grace), asyncio.sleep(config.shutdown_delay))
    server.stop()
    log.info("stopped accepting; %d unfinished relays released to other processes", released)
    await runtime.close()
    await server.close_all_connections()
    log.info("stopped")
