"""`laibao db` and `laibao users`: the schema and the user records, without writing SQL.

Exit status: 0 done, 1 the work failed (database unreachable, no such user), 2 usage or configuration
(no LAIBAO_MYSQL_URL, a secret without LAIBAO_SECRET_KEY, a userid that does not fit). Every error is
one line on stderr; a secret is never printed, not even by ``users list`` (it shows whether one is set).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import replace

from laibao.config import Config
from laibao.errors import StoreError
from stores.tokens import RedisTokenCache
from stores.users import User, UserStore, check_user, open_user_store

__all__ = ["add_parsers", "run"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Usage(Exception):
    """A usage or configuration problem: exit status 2."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``db`` and ``users`` commands to the ``laibao`` parser."""
    db = sub.add_parser("db", help="the user database schema")
    db_sub = db.add_subparsers(dest="action", required=True)
    init = db_sub.add_parser("init", help="create or migrate the tables (idempotent)")
    init.add_argument("--config", help="TOML configuration file")

    users = sub.add_parser("users", help="manage who may use the bots")
    users_sub = users.add_subparsers(dest="action", required=True)
    add = users_sub.add_parser("add", help="add a user, or update the given fields of an existing one")
    add.add_argument("userid", help="the WeCom userid, exactly as WeCom sends it")
    add.add_argument("--name", help="display name")
    add.add_argument("--code", help="the user's code at the auth service")
    secret = add.add_mutually_exclusive_group()
    secret.add_argument("--secret", help="the user's auth secret (prefer --secret-stdin: shell history)")
    secret.add_argument("--secret-stdin", action="store_true", help="read the secret from standard input")
    add.add_argument("--config", help="TOML configuration file")
    for action, text in (
        ("disable", "refuse the user from now on (drops their cached token)"),
        ("enable", "let a disabled user in again"),
        ("remove", "delete the user (drops their cached token)"),
    ):
        command = users_sub.add_parser(action, help=text)
        command.add_argument("userid")
        command.add_argument("--config", help="TOML configuration file")
    listing = users_sub.add_parser("list", help="every user (secrets are never shown)")
    listing.add_argument("--config", help="TOML configuration file")


def run(config: Config, args: argparse.Namespace) -> int:
    """Run one ``db`` / ``users`` command; the exit status."""
    command = f"{args.command} {args.action}"
    try:
        if not config.mysql_url:
            raise _Usage("LAIBAO_MYSQL_URL is not set: user records live in MySQL")
        secret = args.secret if command == "users add" else None
        if command == "users add" and args.secret_stdin:
            # read before the event loop starts: a blocking read must not sit on the loop
            secret = sys.stdin.read().removesuffix("\n").removesuffix("\r")
            if not secret:
                raise _Usage("--secret-stdin: nothing on standard input")
        if secret and not config.secret_key:
            raise _Usage("LAIBAO_SECRET_KEY is required to store a secret (laibao gen-key prints one)")
        return asyncio.run(_run(config, args, secret))
    except _Usage as exc:
        print(f"laibao: {command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"laibao: {command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


async def _run(config: Config, args: argparse.Namespace, secret: str | None) -> int:
    users = open_user_store(config)
    try:
        if args.command == "db":
            return await _db_init(users)
        if args.action == "add":
            return await _add(users, args.userid, args.name, args.code, secret)
        if args.action == "list":
            return await _list(users)
        if args.action in ("disable", "enable"):
            found = await users.set_enabled(args.userid, args.action == "enable")
        else:
            found = await users.remove(args.userid)
        if not found:
            print(f"laibao: users {args.action}: no user {args.userid!r}", file=sys.stderr)
            return EXIT_FAILED
        if args.action != "enable":
            await _drop_tokens(config, args.userid)
        print(f"{args.action}d {args.userid}")
        return EXIT_OK
    finally:
        await users.close()


async def _db_init(users: UserStore) -> int:
    await users.init_schema()
    print(f"database ready: schema version {await users.schema_version()}")
    return EXIT_OK


async def _add(users: UserStore, userid: str, name: str | None, code: str | None, secret: str | None) -> int:
    existing = await users.get(userid)
    # fields not given keep their current value, so `users add ID --name N` never wipes a secret
    base = existing or User(userid)
    user = replace(
        base,
        name=base.name if name is None else name,
        code=base.code if code is None else code,
        secret=base.secret if secret is None else secret,
    )
    try:
        check_user(user)
    except ValueError as exc:
        raise _Usage(str(exc)) from exc
    await users.add(user)
    print(f"{'updated' if existing else 'added'} {userid}")
    return EXIT_OK


async def _list(users: UserStore) -> int:
    rows = [("USERID", "NAME", "CODE", "STATUS", "SECRET", "UPDATED")]
    for user in await users.list():
        rows.append((
            user.userid,
            user.name or "-",
            user.code or "-",
            "enabled" if user.enabled else "disabled",
            "yes" if user.secret else "no",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(user.updated)),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return EXIT_OK


async def _drop_tokens(config: Config, userid: str) -> None:
    """Drop the user's shared token and tell every process to forget its copy (Redis only)."""
    if not config.redis_url:
        return  # no shared cache: a running single process keeps its copy until the token expires
    tokens = RedisTokenCache(config.redis_url, prefix=config.redis_prefix,
                             sentinel_password=config.redis_sentinel_password or None)
    try:
        await tokens.drop(userid)
        await tokens.publish_invalidation(userid)
    except StoreError as exc:
        raise StoreError(f"the user record changed, but their cached token could not be dropped: {exc}") from exc
    finally:
        await tokens.close()
