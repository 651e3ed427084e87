"""The `laibao` command: serve, chat, check, gen-key, init, db, users."""

from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient

from laibao import __version__, admin
from laibao.config import BotConfig, Config, load_config
from laibao.errors import ConfigError, LaibaoError

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="laibao", description="WeCom AI bot ⇄ Dify bridge")
    parser.add_argument("--version", action="version", version=f"laibao {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--port", type=int, help="listen port (overrides LAIBAO_PORT)")
    serve.add_argument("--host", help="listen address (overrides LAIBAO_HOST)")

    chat = sub.add_parser("chat", help="play WeCom against a running laibao and print the answer")
    chat.add_argument("text", help="the message to send")
    chat.add_argument("--config", help="TOML configuration file")
    chat.add_argument("--url", help="callback URL (default: this configuration's, on 127.0.0.1)")
    chat.add_argument("--bot", default="", help="which [[bots]] entry's token and key to use")
    chat.add_argument("--user", default="laibao-cli", help="WeCom userid to send as")
    chat.add_argument("--group", help="send as a group message in this chatid")
    chat.add_argument("--interval", type=float, default=1.0, help="seconds between refresh polls")

    check = sub.add_parser("check", help="validate the configuration and reach Redis and Dify")
    check.add_argument("--config", help="TOML configuration file")

    sub.add_parser("gen-key", help="print a new Token and EncodingAESKey")

    init = sub.add_parser("init", help="write a first .env (new keys, the Dify app) and check Dify")
    init.add_argument("--dify-url", help="Dify API base ending in /v1 (asked on a terminal when missing)")
    init.add_argument("--dify-key", help="the Dify app's API key (asked on a terminal when missing)")
    init.add_argument("--redis-url", default="", help="Redis for several processes (default: none, one process)")
    init.add_argument("--env-file", default=".env", help="where to write (default: .env here)")
    init.add_argument("--force", action="store_true", help="replace an existing file (its keys are lost)")
    admin.add_parsers(sub)  # db init, users add|disable|enable|remove|list
    return parser


def _load(args: argparse.Namespace) -> Config:
    overrides = {k: getattr(args, k) for k in ("port", "host") if getattr(args, k, None) is not None}
    # The user commands only reach the databases: they work on a host without the bots' settings.
    return load_config(config_file=args.config, overrides=overrides,
                       require_bots=args.command not in ("db", "users"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "gen-key":
        from laibao.crypto import generate_aes_key, generate_token

        print(f"LAIBAO_WECOM_TOKEN={generate_token()}")
        print(f"LAIBAO_WECOM_AES_KEY={generate_aes_key()}")
        print(f"LAIBAO_SECRET_KEY={base64.b64encode(os.urandom(32)).decode()}")
        return 0
    if args.command == "init":
        return _init(args)
    try:
        config = _load(args)
    except ConfigError as exc:
        if args.config is None and not Path(".env").exists() and not any(k.startswith("LAIBAO_") for k in os.environ):
            # A first run: one line with the way forward, not a list of every required setting.
            print("laibao: no configuration here (no .env, no LAIBAO_* variables): run `laibao init` "
                  "(or `make init`) to write a first .env", file=sys.stderr)
            return EXIT_USAGE
        for problem in exc.problems:
            print(f"laibao: config: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "serve":
        from laibao.app import configure_logging, run_serve

        configure_logging(config.log_level)
        run_serve(config)
        return 0
    if args.command == "chat":
        return asyncio.run(_chat(config, args))
    if args.command in ("db", "users"):
        return admin.run(config, args)
    return asyncio.run(_check(config))


def _init(args: argparse.Namespace) -> int:
    """`laibao init`: write a first .env, check Dify with it, say what to paste into WeCom."""
    from laibao import firstrun

    path = Path(args.env_file)
    if path.exists() and not args.force:
        print(f"laibao: init: {path} exists and is kept; --force replaces it (WeCom then needs the new keys)",
              file=sys.stderr)
        return EXIT_USAGE
    dify_url, dify_key = args.dify_url, args.dify_key
    if dify_url is None or dify_key is None:
        if not sys.stdin.isatty():
            missing = " and ".join(flag for flag, value in (("--dify-url", dify_url), ("--dify-key", dify_key))
                                   if value is None)
            print(f"laibao: init: {missing} required (no terminal to ask on)", file=sys.stderr)
            return EXIT_USAGE
        if dify_url is None:
            dify_url = input(f"Dify API base URL [{firstrun.DEFAULT_DIFY_URL}]: ").strip() or firstrun.DEFAULT_DIFY_URL
        if dify_key is None:
            dify_key = getpass.getpass("Dify app API key (app-...): ")
    settings = firstrun.fresh_settings(dify_url, dify_key, args.redis_url)
    try:
        config = firstrun.validate(settings)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"laibao: init: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        firstrun.write_env(path, firstrun.render(settings), force=args.force)
    except OSError as exc:
        print(f"laibao: init: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {path} (owner-only) with a new Token, EncodingAESKey and LAIBAO_SECRET_KEY")
    checked = asyncio.run(_check(config))
    bot = config.bots[0]
    print(
        "\nIn the WeCom admin console, create an AI bot (智能机器人) in API mode and set:\n"
        f"  URL             https://<this server's public address>{bot.path}\n"
        f"  Token           {bot.token}\n"
        f"  EncodingAESKey  {bot.aes_key}\n"
        "Then start laibao (make run, or laibao serve) before saving: WeCom checks the URL at once.\n"
        'Try it without WeCom: laibao chat "你好"'
    )
    if checked != 0:
        print(f"laibao: init: Dify did not answer as expected: correct LAIBAO_DIFY_URL / LAIBAO_DIFY_KEY in {path}, "
              "then run `laibao check`", file=sys.stderr)
    return checked


def _pick_bot(config: Config, name: str) -> BotConfig | None:
    return next((bot for bot in config.bots if bot.name == name), None)


async def _chat(config: Config, args: argparse.Namespace) -> int:
    from laibao.chat import Printer, WeComPlayer, converse
    from laibao.crypto import WeComCrypto

    bot = _pick_bot(config, args.bot)
    if bot is None:
        print(f"laibao: chat: no bot named {args.bot!r} in the configuration", file=sys.stderr)
        return EXIT_USAGE
    if bot.websocket:
        print(f"laibao: chat: bot {bot.key!r} runs in websocket mode; chat plays WeCom's callbacks only",
              file=sys.stderr)
        return EXIT_USAGE
    url = args.url or f"http://127.0.0.1:{config.port}{bot.path}"
    http = AsyncHTTPClient(force_instance=True)
    player = WeComPlayer(WeComCrypto(bot.token, bot.aes_key, bot.receive_id), url, http)
    try:
        await converse(player, args.text, args.user, args.group, interval=args.interval, on_update=Printer())
    except LaibaoError as exc:
        print(f"\nlaibao: chat: {exc}", file=sys.stderr)
        return 1
    finally:
        http.close()
    return 0


async def _check(config: Config) -> int:
    from laibao.runtime import Runtime

    runtime = Runtime.build(config)
    failed = False
    try:
        for part, why in (await runtime.readiness()).items():
            print(f"{part}: FAILED {why}")
            failed = True
        if config.redis_url and not failed:
            print("redis: ok")
        for name, bot in runtime.bots.items():
            label = name or "(environment bot)"
            try:
                info = await bot.service.dify.info()
            except LaibaoError as exc:
                print(f"dify {label}: FAILED {exc}")
                failed = True
            else:
                print(f"dify {label}: ok, app mode {info.get('mode', '?')}")
            if bot.config.websocket:
                # Reported from the lease only: a subscribe here would displace the production connection.
                line = await runtime.ws.describe(bot.config.key, label)
                print(line)
                failed = failed or "FAILED" in line
    finally:
        await runtime.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
