"""`laibao init`: the first `.env` of a new deployment (the CLI then checks Dify with it)."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping
from pathlib import Path

from laibao.config import Config, load_config
from laibao.crypto import generate_aes_key, generate_token
from laibao.errors import ConfigError

DEFAULT_DIFY_URL = "https://api.dify.ai/v1"
# A .env line holds one value up to the end of the line: no line breaks, no surrounding quotes to strip.
_PLAIN_VALUE = re.compile(r"^[^\s\"'#]+$")

_TEMPLATE = """\
# Written by `laibao init`. Never commit this file: it holds the bot's keys.
# The first three are new: give the Token and EncodingAESKey to WeCom (admin console, the bot's API settings).
LAIBAO_WECOM_TOKEN={LAIBAO_WECOM_TOKEN}
LAIBAO_WECOM_AES_KEY={LAIBAO_WECOM_AES_KEY}
# Encrypts the users' auth secrets in MySQL (auth mode "token").
LAIBAO_SECRET_KEY={LAIBAO_SECRET_KEY}
LAIBAO_DIFY_URL={LAIBAO_DIFY_URL}
LAIBAO_DIFY_KEY={LAIBAO_DIFY_KEY}
# Unset: in-process store, one process only. Set it to run several processes (supervisord, Docker, Kubernetes).
{redis_line}
# LAIBAO_MYSQL_URL=mysql://laibao:password@127.0.0.1:3306/laibao
# LAIBAO_PORT=8000
# LAIBAO_LOG_LEVEL=INFO
# Every setting: README.md, Configuration.
"""


def fresh_settings(dify_url: str, dify_key: str, redis_url: str = "") -> dict[str, str]:
    """The settings of a new deployment: new WeCom keys and secret key, the given Dify app (and Redis)."""
    settings = {
        "LAIBAO_WECOM_TOKEN": generate_token(),
        "LAIBAO_WECOM_AES_KEY": generate_aes_key(),
        "LAIBAO_SECRET_KEY": base64.b64encode(os.urandom(32)).decode(),
        "LAIBAO_DIFY_URL": dify_url.strip(),
        "LAIBAO_DIFY_KEY": dify_key.strip(),
    }
    if redis_url.strip():
        settings["LAIBAO_REDIS_URL"] = redis_url.strip()
    return settings


def validate(settings: Mapping[str, str]) -> Config:
    """The Config these settings give, exactly as `laibao serve` would read them (ConfigError otherwise)."""
    problems = [
        f"{name}: must be one word without spaces, quotes or '#'"
        for name in ("LAIBAO_DIFY_URL", "LAIBAO_DIFY_KEY", "LAIBAO_REDIS_URL")
        if settings.get(name) and not _PLAIN_VALUE.match(settings[name])
    ]
    if problems:
        raise ConfigError(problems)
    return load_config(environ=settings, dotenv=None)


def render(settings: Mapping[str, str]) -> str:
    """The text of the .env file."""
    redis_url = settings.get("LAIBAO_REDIS_URL", "")
    redis_line = f"LAIBAO_REDIS_URL={redis_url}" if redis_url else "# LAIBAO_REDIS_URL=redis://127.0.0.1:6379/1"
    return _TEMPLATE.format(redis_line=redis_line, **settings)


def write_env(path: Path, text: str, *, force: bool) -> None:
    """Write ``text`` to ``path``, readable by its owner only; an existing file is replaced only with ``force``."""
    if not force:
        # O_EXCL: a file that appears meanwhile is not overwritten either.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        return
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(partial, path)  # the old file stays whole until the new one is complete
    finally:
        partial.unlink(missing_ok=True)

