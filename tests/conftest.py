"""Shared fixtures: a clean asyncio-backed IOLoop per test, a real redis-server and MariaDB per session."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import tornado.ioloop
from hypothesis import settings
from tornado.httpclient import AsyncHTTPClient

from laibao.outbound import HostAllowlist, Outbound
from tests.difystub import DifyStub
from tests.servers import MariaDBServer, RedisCluster, RedisSentinelSet, RedisServer, running, serving
from tests.wecomstub import ResponseUrlStub

# Hypothesis fails an example that takes over 200 ms by default; on two busy cores a crypto or SSE
# example can, so no property test in this suite has a per-example deadline. The suite's examples are
# the same on every run (derandomize), so a landing is never blocked by a case found by chance; hunt for
# new ones with `pytest --hypothesis-profile=explore` and pin what is found with @example.
settings.register_profile("laibao", deadline=None, derandomize=True)
settings.register_profile("explore", deadline=None, max_examples=1000)
settings.load_profile("laibao")


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
    with running(RedisServer()) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of a running, empty Redis (restarted if a test stopped it)."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One 3-primary Redis Cluster (a replica each) for the whole run."""
    with running(RedisCluster(replicas=1)) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelSet]:
    """One primary + replica + sentinel set for the whole run (tests that fail it over start their own)."""
    with running(RedisSentinelSet()) as servers:
        yield servers


# The Redis modes a contract suite runs in: list them as a fixture's params, then call redis_url_for.
REDIS_MODES = ["redis", pytest.param("cluster", marks=pytest.mark.cluster),
               pytest.param("sentinel", marks=pytest.mark.sentinel)]


def redis_url_for(request: pytest.FixtureRequest, mode: str) -> str:
    """An empty Redis in ``mode``: one server, a cluster or a sentinel set (each started once per run)."""
    if mode == "redis":
        return str(request.getfixturevalue("redis_url"))
    servers = request.getfixturevalue("redis_cluster" if mode == "cluster" else "redis_sentinel")
    servers.flush()
    return str(servers.url)


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDBServer]:
    """One real MariaDB server for the whole run, in a temporary datadir on a free port."""
    with running(MariaDBServer()) as server:
        yield server


@pytest.fixture
def mysql_url(mariadb_server: MariaDBServer) -> Iterator[str]:
    """The URL of a fresh, empty database on the running MariaDB (dropped after the test)."""
    if mariadb_server.proc is None:
        mariadb_server.start()
    database = mariadb_server.create_database()
    yield mariadb_server.url(database)
    mariadb_server.drop_database(database)


@pytest.fixture
def responses(io_loop: tornado.ioloop.IOLoop) -> Iterator[ResponseUrlStub]:
    """WeCom's response_url endpoint, on this test's loop."""
    with serving(io_loop, ResponseUrlStub()) as stub:
        yield stub


@pytest.fixture
def stub(io_loop: tornado.ioloop.IOLoop) -> Iterator[DifyStub]:
    """A Dify stand-in on this test's loop, with the default app key."""
    with serving(io_loop, DifyStub()) as server:
        yield server


@pytest.fixture
def http(io_loop: tornado.ioloop.IOLoop) -> Iterator[AsyncHTTPClient]:
    """A private AsyncHTTPClient, closed after the test."""

    async def make() -> AsyncHTTPClient:
        return AsyncHTTPClient(force_instance=True)

    client = io_loop.run_sync(make)
    yield client
    client.close()


def make_outbound(max_clients: int = 10) -> Outbound:
    """laibao's HTTP clients as a test needs them: the stand-ins on 127.0.0.1 are configured upstreams."""
    return Outbound(max_clients=max_clients, trusted=["127.0.0.1"],
                    wecom_media=HostAllowlist("WeCom media", ("127.0.0.1",)))


@pytest.fixture
def outbound(io_loop: tornado.ioloop.IOLoop) -> Iterator[Outbound]:
    """laibao's own HTTP clients (``make_outbound``), closed after the test."""

    async def make() -> Outbound:
        return make_outbound()

    client = io_loop.run_sync(make)
    yield client
    client.close()
