"""The one Redis client factory: plain Redis, Sentinel or Cluster, chosen by the URL's scheme.

    redis://[[user]:password@]host:port/db          rediss:// for TLS, unix:///path?db=N for a socket
    redis+sentinel://[[user]:password@]host:port[,host:port...]/master_name[/db]
    redis+cluster://[[user]:password@]host:port[,host:port...]

The user and password are Redis's (ACL); sentinels that need their own password get it separately
(``LAIBAO_REDIS_SENTINEL_PASSWORD``). Every client decodes to str, keeps surrogates (any Python str
round-trips), times out, and retries once on a connection error only: a timed-out script may have run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from stores.errors import StoreError, redis_errors
from stores.numbers import ascii_digits

PLAIN, SENTINEL, CLUSTER = "redis", "sentinel", "cluster"
SCHEMES = {"redis": PLAIN, "rediss": PLAIN, "unix": PLAIN, "redis+sentinel": SENTINEL, "rediss+sentinel": SENTINEL,
           "redis+cluster": CLUSTER, "rediss+cluster": CLUSTER}

# What every client gets; ``Client`` is either client class (they share the command API).
Client = Any


@dataclass(frozen=True)
class RedisTarget:
    """A parsed LAIBAO_REDIS_URL."""

    mode: str  # PLAIN, SENTINEL or CLUSTER
    url: str  # the plain URL (PLAIN only)
    hosts: tuple[tuple[str, int], ...] = ()  # sentinels or cluster seeds
    master: str = ""  # the sentinel service name
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False


def parse_url(url: str) -> RedisTarget:
    """Parse a LAIBAO_REDIS_URL; ValueError names what is wrong (never the password)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    mode = SCHEMES.get(scheme)
    if mode is None:
        raise ValueError("must start with redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://")
    if mode == PLAIN:
        return RedisTarget(PLAIN, url)
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not ascii_digits(port, 5) or not 0 < int(port) < 65536:
            raise ValueError(f"each node must be host:port, not {item.strip()!r}")
        hosts.append((host.strip("[]"), int(port)))
    path = [part for part in parts.path.split("/") if part]
    master, db = "", 0
    if mode == SENTINEL:
        if not path or len(path) > 2:
            raise ValueError("a sentinel URL ends in /master_name or /master_name/db")
        master = unquote(path[0])
        if len(path) == 2:
            if not ascii_digits(path[1], 5):
                raise ValueError(f"the database must be a number, not {path[1]!r}")
            db = int(path[1])
    elif path:
        raise ValueError("a cluster URL has no path: Redis Cluster has database 0 only")
    return RedisTarget(mode, "", tuple(hosts), master, db, username, password, scheme.startswith("rediss"))


class _Cluster(RedisCluster):
    """redis-py's cluster client, initialised by the first command alone.

    redis-py 8.1 lets the commands that arrive while it first learns the cluster layout race for
    connections, and some fail (a connection closed under them); a layout learnt before they run
    avoids that.
    """

    _ready: asyncio.Lock | None = None
    _started = False

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """Learn the layout once (the first caller; the others wait), then run the command."""
        if not self._started:
            if self._ready is None:
                self._ready = asyncio.Lock()
            async with self._ready:
                if not self._started:
                    await self.initialize()
                    self._started = True
        return await super().execute_command(*args, **kwargs)


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (finds the primary, follows a failover) that waits for a free connection."""


def connect(
    url: str,
    *,
    sentinel_password: str | None = None,
    pool_size: int = 50,
    pool_timeout: float = 5.0,
    connect_timeout: float = 2.0,
    timeout: float = 5.0,
) -> Client:
    """A client for ``url``: a bounded pool of ``pool_size``; a burst waits up to ``pool_timeout`` for a connection.

    On a cluster the bound is per node and redis-py's cluster client does not wait for a connection:
    past ``pool_size`` in use on one node a call fails at once (StoreError), so size it for the burst.
    """
    target = parse_url(url)
    # One quick retry, on connection errors only: it covers a pooled socket the server closed (a
    # restart, an idle timeout, a failover). A timeout is not retried: the script may have run.
    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=1,
                  supported_errors=(RedisConnectionError,))
    common: dict[str, Any] = {
        "decode_responses": True,
        "encoding_errors": "surrogatepass",
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": timeout,
        "health_check_interval": 30,
        "retry": retry,
    }
    if target.mode == PLAIN:
        pool = BlockingConnectionPool.from_url(url, max_connections=pool_size, timeout=pool_timeout, **common)
        return aioredis.Redis.from_pool(pool)
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.mode == SENTINEL:
        sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": connect_timeout, "socket_timeout": timeout,
                                           "decode_responses": True}
        if sentinel_password:
            sentinel_kwargs["password"] = sentinel_password
        if target.tls:
            sentinel_kwargs["ssl"] = True
        sentinel = Sentinel(list(target.hosts), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
        return sentinel.master_for(
            target.master, connection_pool_class=_BlockingSentinelPool, db=target.db,
            max_connections=pool_size, timeout=pool_timeout, ssl=target.tls, **auth, **common,
        )
    return _Cluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
        max_connections=pool_size, ssl=target.tls, **auth, **common,
    )


class ClusterScript:
    """A script a cluster client sends whole (EVAL), with the signature of redis-py's registered scripts.

    redis-py 8.1's cluster client can break connections when many calls of a script it has not loaded
    yet (EVALSHA, NOSCRIPT, load, retry) run at once; a node promoted or added later has no scripts
    either. Sending the body costs a few hundred bytes a call and has no such state.
    """

    def __init__(self, client: Client, text: str) -> None:
        self._client = client
        self._text = text

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Client = None) -> Any:
        """Run the script on ``keys`` (one slot) with ``args``."""
        return await (client or self._client).eval(self._text, len(keys), *keys, *args)


def register(client: Client, text: str) -> Any:
    """A callable script for ``client``: redis-py's own (EVALSHA) on one server, EVAL on a cluster."""
    return ClusterScript(client, text) if isinstance(client, RedisCluster) else client.register_script(text)


def is_cluster(client: Client) -> bool:
    """True for a Redis Cluster client (scripts must then keep to one slot per call)."""
    return isinstance(client, RedisCluster)


async def close(client: Client) -> None:
    """Close the client and, for Sentinel, its connections to the sentinels too."""
    pool = getattr(client, "connection_pool", None)
    await client.aclose()
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


async def describe(client: Client) -> str:
    """Which mode the client is in and what it reached (for ``laibao check``); StoreError if nothing."""
    with redis_errors("describe"):
        await client.ping()
        if isinstance(client, RedisCluster):
            primaries = client.get_primaries()
            return f"cluster, {len(client.get_nodes())} nodes ({len(primaries)} primaries)"
        pool = client.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]
            return f"sentinel, primary {pool.service_name} at {host}:{port}"
        kwargs = pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
        return f"single server at {where}"


__all__ = ["CLUSTER", "PLAIN", "SENTINEL", "Client", "RedisTarget", "StoreError", "close", "connect", "describe",
           "is_cluster", "parse_url", "register"]
