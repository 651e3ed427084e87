"""Shared fixtures: a clean asyncio-backed IOLoop per test and a real redis-server per session."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import tornado.ioloop

from tests.servers import RedisServer


@pytest.fixture
def io_loop() -> Iterator[tornado.ioloop.IOLoop]:
    """Replace pytest-tornado's io_loop, which calls the deprecated IOLoop.make_current()."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    io_loop = tornado.ioloop.IOLoop.current()
    yield io_loop
    io_loop.close(all_fds=True)
    asyncio.set_event_loop(None)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the whole run, on a free port in a temporary directory."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of a running, empty Redis (restarted if a test stopped it)."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url
