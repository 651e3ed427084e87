"""What a user's message asks for: a command, or a query for Dify (mentions stripped, quote added)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from laibao import texts
from laibao.config import BotConfig
from laibao.wecom import Callback

# WeCom keeps "@RobotName" in a group message's text; names have no spaces, the mention ends at one.
_LEADING_MENTIONS = re.compile(r"^(?:\s*@\S+(?:\s+|$))+")

NEW, STOP, HELP = "new", "stop", "help"
MAX_MIXED_IMAGES = 10  # each image is downloaded, decrypted and uploaded to Dify before the question goes
DEFAULT_HELP = "直接发送问题即可。{new}：开始新对话；{stop}：停止当前回答；{help}：查看帮助。"


@dataclass(frozen=True)
class Inbound:
    """A message reduced to what the relay needs."""

    text: str  # the query text for Dify ("" for media alone)
    command: str = ""  # NEW, STOP, HELP or ""
    media: tuple[Mapping[str, str], ...] = ()  # {"kind": "image"|"file"|"video", "url": ...}
    refusal: str = ""  # the message cannot be taken as sent: answer this instead (nothing is kept)


def strip_mentions(text: str) -> str:
    """Remove the leading @-mentions WeCom leaves in a group message."""
    return _LEADING_MENTIONS.sub("", text, count=1).strip()


def command_of(text: str, bot: BotConfig) -> str:
    """NEW, STOP or HELP when ``text`` is one of the bot's command words (case-insensitive), else ""."""
    word = text.strip().lower()
    for command, words in ((NEW, bot.new_words), (STOP, bot.stop_words), (HELP, bot.help_words)):
        if word in (w.lower() for w in words):
            return command
    return ""


def help_text(bot: BotConfig) -> str:
    """The help reply: the configured text, or one built from the first word of each command."""
    if bot.help_text:
        return bot.help_text
    first = {name: (words[0] if words else "") for name, words in
             (("new", bot.new_words), ("stop", bot.stop_words), ("help", bot.help_words))}
    return DEFAULT_HELP.format(**first)


def _quoted_text(quote: Any) -> str:
    """The text of a quoted message (text, voice or the text items of a mixed message)."""
    if not isinstance(quote, Mapping):
        return ""
    kind = quote.get("msgtype")
    body = quote.get(kind) if isinstance(kind, str) else None
    if not isinstance(body, Mapping):
        return ""
    if kind in ("text", "voice") and isinstance(body.get("content"), str):
        return str(body["content"]).strip()
    if kind == "mixed":
        return " ".join(t for t, _ in _mixed_items(body)).strip()
    return ""


def _with_key(media: dict[str, str], body: Any) -> dict[str, str]:
    """A media entry with the item's own ``aeskey`` (long-connection mode encrypts each item with its own)."""
    key = body.get("aeskey") if isinstance(body, Mapping) else None
    if isinstance(key, str) and key:
        media["aeskey"] = key
    return media


def _mixed_media(body: Mapping[str, Any]) -> list[Mapping[str, str]]:
    """The images of a mixed message as media entries, each with its own aeskey when it has one."""
    items = body.get("msg_item")
    media: list[Mapping[str, str]] = []
    for item in items if isinstance(items, list) else []:
        image = item.get("image") if isinstance(item, Mapping) and item.get("msgtype") == "image" else None
        url = image.get("url") if isinstance(image, Mapping) else None
        if isinstance(url, str) and url:
            media.append(_with_key({"kind": "image", "url": url}, image))
    return media


def _mixed_items(body: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(text, image url) pairs of a mixed message's items; one side is always ""."""
    items = body.get("msg_item")
    out: list[tuple[str, str]] = []
    if not isinstance(items, list):
        return out
    for item in items:
        if not isinstance(item, Mapping):
            continue
        if item.get("msgtype") == "text" and isinstance(item.get("text"), Mapping):
            content = item["text"].get("content")
            if isinstance(content, str):
                out.append((content, ""))
        elif item.get("msgtype") == "image" and isinstance(item.get("image"), Mapping):
            url = item["image"].get("url")
            if isinstance(url, str) and url:
                out.append(("", url))
    return out


def read_message(callback: Callback, bot: BotConfig) -> Inbound:
    """The query, command and media of a text, voice, mixed, image, file or video callback."""
    raw = callback.raw
    media: list[Mapping[str, str]] = []
    if callback.msgtype == "mixed":
        body = raw.get("mixed")
        pairs = _mixed_items(body) if isinstance(body, Mapping) else []
        text = " ".join(t for t, _ in pairs if t)
        media = _mixed_media(body) if isinstance(body, Mapping) else []
        if len(media) > MAX_MIXED_IMAGES:
            return Inbound(text="", refusal=texts.TOO_MANY_IMAGES)
    elif callback.msgtype in ("image", "file", "video"):
        body = raw.get(callback.msgtype)
        url = body.get("url") if isinstance(body, Mapping) else None
        text = ""
        if isinstance(url, str) and url:
            media = [_with_key({"kind": callback.msgtype, "url": url}, body)]
    else:
        text = callback.text
    if callback.is_group:
        text = strip_mentions(text)
    text = text.strip()
    if not media and (command := command_of(text, bot)):
        return Inbound(text=text, command=command)
    quoted = _quoted_text(raw.get("quote"))
    if quoted and text:
        text = f"{text}\n\n（引用的消息：{quoted}）"
    return Inbound(text=text, media=tuple(media))
