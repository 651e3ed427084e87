"""Who may talk to a bot, and the token that travels with their messages to Dify.

Per bot ``auth`` mode:

    open       anyone who reaches the bot: Credential(userid), no store is read
    allowlist  users present and enabled in the user store
    token      1. this process's TTLCache (short TTL)
               2. the shared TokenCache (Redis: authorization:wechatid:{userid} -> token -> info)
               3. the user's record (unknown or disabled -> NotAuthorized, nothing cached), then the
                  external auth service (POST code + secret -> token + lifetime), stored in both levels

The callback path only *admits* (``admit``): whether the user may use the bot, from a live token in
either cache level or from the user's record (itself cached per process), bounded by
``auth_admit_timeout``; it never calls the auth service. The sign-in (``resolve``) runs in the answer
job, so nothing outside laibao holds up WeCom's callback.

One user's concurrent messages make one call to the auth service: on one process they share one
in-flight task; across processes the first to take a short Redis lock calls the service while the
others poll the shared cache until the token appears (bounded by ``auth_timeout`` plus a margin).

    AuthError
    ├── NotAuthorized    the user may not use the bot (reply with the bot's denied_text)
    └── AuthUnavailable  sign-in could not be done now: auth service or a store down, slow or garbled

Neither the secret nor a token is ever logged: failures name the userid and the kind of failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

from cachetools import TTLCache

from laibao.config import BotConfig, Config
from laibao.errors import (
    AuthUnavailable,
    NotAuthorized,
    StoreError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamTooLarge,
)
from laibao.outbound import Outbound, Reply, parse_json
from stores.numbers import ascii_digits
from stores.tokens import EVERY_USER, TokenCache
from stores.users import User, UserStore

__all__ = ["ADMISSIONS", "LEVELS", "AuthService", "AuthUnavailable", "Credential", "NotAuthorized", "lookup", "nest"]

log = logging.getLogger("laibao.auth")

T = TypeVar("T")

# How resolutions are counted in AuthService.stats (one count per resolve call).
LEVELS = (
    "process",  # token mode: this process's cache
    "redis",  # token mode: the shared cache
    "service",  # token mode: a fresh call to the auth service
    "joined",  # token mode: waited for another resolve of the same user on this process
    "allowed",  # allowlist mode: present and enabled
    "denied",  # unknown or disabled user
    "failed",  # AuthUnavailable
)
# How admissions on the callback path are counted in AuthService.admissions.
ADMISSIONS = (
    "token",  # token mode: a live token in this process's cache or in Redis
    "allowed",  # the user's record (cached or read) says enabled
    "refused",  # unknown or disabled user
    "undecided",  # not known within auth_admit_timeout, or a store was down: the answer job decides
)
LOCK_MARGIN = 1.0  # seconds a sign-in lock outlives the auth call it guards
POLL_INTERVAL = 0.025  # seconds between looks at the shared cache while another process signs in
MAX_TOKEN_LEN = 4096  # it becomes part of a Redis key and an HTTP header


@dataclass(frozen=True)
class Credential:
    """Who a message comes from, and the token to forward to Dify (token mode only)."""

    userid: str
    name: str = ""
    token: str = field(default="", repr=False)


@dataclass(frozen=True)
class _Entry:
    """A credential in the process cache, with the end of its token's life."""

    credential: Credential
    expires: float


class AuthService:
    """Resolves WeCom users to credentials for each bot's auth mode (one per process)."""

    lock_margin = LOCK_MARGIN

    def __init__(
        self,
        config: Config,
        users: UserStore,
        tokens: TokenCache,
        http: Outbound,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.users = users
        self.tokens = tokens
        self.http = http
        self.stats: dict[str, int] = dict.fromkeys(LEVELS, 0)
        self.admissions: dict[str, int] = dict.fromkeys(ADMISSIONS, 0)
        self._clock = clock
        self._local: TTLCache[str, _Entry] = TTLCache(
            maxsize=config.token_cache_size, ttl=config.token_cache_ttl, timer=clock
        )
        # Admission decisions from the user record (True = enabled), dropped with the user's tokens.
        self._admitted: TTLCache[str, bool] = TTLCache(
            maxsize=config.token_cache_size, ttl=config.token_cache_ttl, timer=clock
        )
        self._lookups: dict[str, asyncio.Task[tuple[bool, str]]] = {}  # admission look-ups, per user
        self._inflight: dict[str, asyncio.Task[tuple[Credential, str]]] = {}  # joinable, per user
        self._running: set[asyncio.Task[Any]] = set()  # every sign-in and look-up, for close()
        # Bumped by every invalidation: a fetch that saw it change must not fill the process cache,
        # or a token invalidated while the fetch was reading Redis would live on here.
        self._generation = 0

    async def start(self) -> None:
        """Listen for invalidations from every process (only needed when a bot uses token mode)."""
        if any(bot.auth == "token" for bot in self.config.bots):
            await self.tokens.listen_invalidations(self._on_invalidation)

    async def close(self) -> None:
        """Cancel sign-ins in flight and close the token cache and the user store this service owns."""
        tasks = list(self._running)
        self._inflight.clear()
        self._lookups.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.tokens.close()
        await self.users.close()

    async def resolve(self, bot: BotConfig, userid: str) -> Credential:
        """The credential of ``userid`` for ``bot``; NotAuthorized or AuthUnavailable otherwise."""
        if bot.auth == "open":
            return Credential(userid)
        if bot.auth == "allowlist":
            user = await self._user(userid)
            if user is None or not user.enabled:
                self.stats["denied"] += 1
                raise NotAuthorized(userid)
            self.stats["allowed"] += 1
            return Credential(userid, user.name)
        if bot.auth == "token":
            return await self._resolve_token(userid)
        raise ValueError(f"unknown auth mode {bot.auth!r}")

    async def admit(self, bot: BotConfig, userid: str) -> bool | None:
        """May ``userid`` use ``bot``? True or False, or None when that is not known within
        ``auth_admit_timeout`` seconds (the answer job then decides, through ``resolve``).

        For the callback path: it reads only laibao's own stores (the token caches, the user record)
        and never calls the auth service. A look-up that outlives the bound keeps running and fills
        the cache for the user's next message.
        """
        if bot.auth == "open":
            return True
        if bot.auth == "token":
            entry = self._local.get(userid)
            if entry is not None and entry.expires > self._clock():
                self.admissions["token"] += 1
                return True  # a live token is only ever issued to an enabled user
        known = self._admitted.get(userid)
        if known is None:
            task = self._lookups.get(userid)
            if task is None:
                task = asyncio.get_running_loop().create_task(
                    self._look_up(userid, bot.auth == "token"), name=f"laibao-admit-{userid}"
                )
                self._lookups[userid] = task
                self._running.add(task)
                task.add_done_callback(lambda done: self._looked_up(userid, done))
            try:
                known, level = await asyncio.wait_for(asyncio.shield(task), self.config.auth_admit_timeout)
            except (TimeoutError, AuthUnavailable):
                self.admissions["undecided"] += 1
                return None
        else:
            level = "allowed" if known else "refused"
        self.admissions[level] += 1
        return known

    async def decide(self, bot: BotConfig, userid: str) -> bool:
        """``admit`` without the time bound, for work that runs in the background (feedback, a deferred
        command); AuthUnavailable when a store cannot tell."""
        if bot.auth == "open":
            return True
        known = self._admitted.get(userid)
        if known is not None:
            return known
        task = self._lookups.get(userid)
        if task is None:
            allowed, _ = await self._look_up(userid, bot.auth == "token")
            return allowed
        allowed, _ = await asyncio.shield(task)
        return allowed

    async def _look_up(self, userid: str, token_mode: bool) -> tuple[bool, str]:
        """(allowed, counting level) from the shared token cache, then the user's record."""
        generation = self._generation
        if token_mode and await self._shared(userid) is not None:
            return True, "token"
        user = await self._user(userid)
        allowed = user is not None and user.enabled
        if generation == self._generation:  # an invalidation meanwhile may concern this very record
            self._admitted[userid] = allowed
        return allowed, "allowed" if allowed else "refused"

    def _looked_up(self, userid: str, task: asyncio.Task[tuple[bool, str]]) -> None:
        self._running.discard(task)
        if self._lookups.get(userid) is task:
            del self._lookups[userid]
        if not task.cancelled():
            task.exception()  # retrieved: a look-up whose caller gave up is not reported as lost

    async def invalidate(self, userid: str, token: str) -> None:
        """Forget ``token`` everywhere (it was refused): shared cache, this process, every other process.

        Never raises: a store failure is logged, and the next ``resolve`` reports it.
        """
        self._on_invalidation(userid)
        try:
            await self.tokens.drop(userid, token)
        except StoreError as exc:
            log.warning("could not drop the token of %s from the shared cache: %s", userid, exc)
        try:
            await self.tokens.publish_invalidation(userid)
        except StoreError as exc:
            log.warning("could not publish the invalidation of %s: %s", userid, exc)

    # ------------------------------------------------------------------------------ token mode

    async def _resolve_token(self, userid: str) -> Credential:
        entry = self._local.get(userid)
        if entry is not None:
            if entry.expires > self._clock():
                self.stats["process"] += 1
                return entry.credential
            self._local.pop(userid, None)  # the token itself ended before the cache entry
        task = self._inflight.get(userid)
        joined = task is not None
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(userid), name=f"laibao-auth-{userid}")
            self._inflight[userid] = task
            self._running.add(task)
            task.add_done_callback(lambda done: self._fetched(userid, done))
        try:
            # shielded: a caller that gives up (its request was cancelled) leaves the sign-in running
            # for the others waiting on it
            credential, level = await asyncio.shield(task)
        except NotAuthorized:
            self.stats["denied"] += 1
            raise
        except AuthUnavailable:
            self.stats["failed"] += 1
            raise
        self.stats["joined" if joined else level] += 1
        return credential

    def _fetched(self, userid: str, task: asyncio.Task[tuple[Credential, str]]) -> None:
        self._running.discard(task)
        if self._inflight.get(userid) is task:
            del self._inflight[userid]
        if not task.cancelled():
            task.exception()  # retrieved here, so a failure nobody awaited any more is not reported as lost

    async def _fetch(self, userid: str) -> tuple[Credential, str]:
        """Levels 2 and 3: the shared cache, then the user's record and the auth service."""
        generation = self._generation
        cached = await self._shared(userid)
        if cached is not None:
            return self._remember(cached, generation), "redis"
        user = await self._user(userid)
        if user is None or not user.enabled:
            log.info("token sign-in refused for %s: %s", userid, "unknown user" if user is None else "disabled")
            raise NotAuthorized(userid)

        loop = asyncio.get_running_loop()
        timeout = self.config.auth_timeout
        # a waiter outlasts the holder's lock, so it can take over from a holder that died
        give_up = loop.time() + timeout + 2 * self.lock_margin
        while True:
            lock_id = await self._store_call(userid, self.tokens.acquire_lock(userid, timeout + self.lock_margin))
            if lock_id is not None:
                try:
                    # another process may have stored the token between our look and the lock
                    cached = await self._shared(userid)
                    if cached is not None:
                        return self._remember(cached, generation), "redis"
                    credential, ttl = await self._sign_in(user)
                    info = {"userid": userid, "name": user.name, "code": user.code,
                            "expires_at": self._clock() + ttl}
                    await self._store_call(userid, self.tokens.put(userid, credential.token, info, ttl))
                finally:
                    try:
                        await self.tokens.release_lock(userid, lock_id)
                    except StoreError as exc:  # it expires on its own within seconds
                        log.warning("could not release the sign-in lock of %s: %s", userid, exc)
                return self._remember((credential, self._clock() + ttl), generation), "service"
            # another process is signing the user in: wait for its token, or for its lock to go
            if loop.time() >= give_up:
                self._fail(userid, "timeout waiting for another process's sign-in")
            await asyncio.sleep(POLL_INTERVAL)
            cached = await self._shared(userid)
            if cached is not None:
                return self._remember(cached, generation), "redis"

    async def _shared(self, userid: str) -> tuple[Credential, float] | None:
        """The user's credential and its end of life from the shared cache, or None."""
        found = await self._store_call(userid, self.tokens.get(userid))
        if found is None:
            return None
        token, info = found
        name = info.get("name")
        expires_at = info.get("expires_at")
        # another writer's info may lack expires_at: the shared key's own TTL still bounds the token,
        # and the process cache re-reads it within token_cache_ttl
        expires = _number(expires_at)
        if expires is None:
            expires = math.inf
        return Credential(userid, name if isinstance(name, str) else "", token), expires

    def _remember(self, found: tuple[Credential, float], generation: int) -> Credential:
        credential, expires = found
        if generation == self._generation and expires > self._clock():
            self._local[credential.userid] = _Entry(credential, expires)
        return credential

    def _on_invalidation(self, userid: str) -> None:
        """Drop the local copy (every one for EVERY_USER); later resolves start a fresh fetch."""
        self._generation += 1
        log.debug("invalidation: dropping the local token of %s", "every user" if userid == EVERY_USER else userid)
        if userid == EVERY_USER:
            self._local.clear()
            self._admitted.clear()
            self._inflight.clear()
            self._lookups.clear()
        else:
            self._local.pop(userid, None)
            self._admitted.pop(userid, None)
            self._inflight.pop(userid, None)
            self._lookups.pop(userid, None)

    async def _sign_in(self, user: User) -> tuple[Credential, float]:
        """POST the user's code and secret to the auth service; their token and its lifetime in seconds."""
        config = self.config
        body: dict[str, Any] = {}
        nest(body, config.auth_code_field, user.code)
        nest(body, config.auth_secret_field, user.secret)
        try:
            # A short call: no redirects (a redirected POST would lose the credentials), about 1 MB at most.
            reply = await self.http.fetch(
                config.auth_url,
                method="POST",
                headers={"Content-Type": "application/json; charset=utf-8", "Accept": "application/json"},
                body=json.dumps(body, ensure_ascii=False).encode(),
                connect_timeout=config.auth_timeout,
                timeout=config.auth_timeout,
            )
        except UpstreamTimeout:
            self._fail(user.userid, "timeout")
        except UpstreamTooLarge as exc:
            self._fail(user.userid, f"the answer is larger than {exc.limit} bytes")
        except UpstreamError as exc:
            self._fail(user.userid, f"unreachable ({exc})")
        token, ttl = self._read_answer(user.userid, reply)
        log.info("signed in %s at the auth service (token valid %.0f s)", user.userid, ttl)
        return Credential(user.userid, user.name, token), ttl

    def _read_answer(self, userid: str, reply: Reply) -> tuple[str, float]:
        config = self.config
        if not 200 <= reply.status < 300:
            hint = " (the user's code or secret was refused)" if reply.status in (401, 403) else ""
            self._fail(userid, f"HTTP {reply.status}{hint}")
        try:
            payload = parse_json(reply.body)
        except ValueError:  # not JSON, not UTF-8, or nested too deeply
            self._fail(userid, "the answer is not JSON")
        token = lookup(payload, config.auth_token_field)
        if not isinstance(token, str) or not token:
            self._fail(userid, f"the answer has no token at {config.auth_token_field!r}")
        if len(token) > MAX_TOKEN_LEN or not all("\x21" <= ch <= "\x7e" for ch in token):
            self._fail(userid, "the token is not printable ASCII of at most 4096 characters")
        raw_ttl = lookup(payload, config.auth_ttl_field)
        ttl = config.auth_default_ttl
        if raw_ttl is not None:
            number = _number(raw_ttl)
            if number is not None and number > 0:
                # A lifetime of years would keep a token in Redis (and out of reach of a re-check) as long.
                ttl = min(number, config.auth_max_ttl)
            else:
                log.warning("auth service gave %s no usable lifetime at %r; using %g s",
                            userid, config.auth_ttl_field, ttl)
        return token, ttl

    def _fail(self, userid: str, kind: str) -> NoReturn:
        log.warning("sign-in for %s failed: %s", userid, kind)
        raise AuthUnavailable(userid, kind)

    # ------------------------------------------------------------------------------ the stores

    async def _user(self, userid: str) -> User | None:
        try:
            return await self.users.get(userid)
        except StoreError as exc:
            log.warning("user store unavailable while resolving %s: %s", userid, exc)
            raise AuthUnavailable(userid, "user store unavailable") from exc

    async def _store_call(self, userid: str, call: Awaitable[T]) -> T:
        """Await a token-cache call, turning StoreError into AuthUnavailable."""
        try:
            return await call
        except StoreError as exc:
            log.warning("token cache unavailable while resolving %s: %s", userid, exc)
            raise AuthUnavailable(userid, "token cache unavailable") from exc


def lookup(payload: Any, path: str) -> Any:
    """The value at a dotted ``path`` ("data.token", "data.items.0.token"), or None."""
    if isinstance(payload, Mapping) and path in payload:
        return payload[path]
    value = payload
    for part in path.split("."):
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and ascii_digits(part, 9) and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def nest(body: dict[str, Any], path: str, value: Any) -> None:
    """Set ``value`` at a dotted ``path`` in ``body``, creating the objects on the way."""
    *parents, last = path.split(".")
    target = body
    for part in parents:
        child = target.get(part)
        if not isinstance(child, dict):
            child = target[part] = {}
        target = child
    target[last] = value


def _number(value: Any) -> float | None:
    """A finite number given as a JSON number or a numeric string, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
