"""What a user's message asks for: a command, or a query for Dify (mentions stripped, quote added)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

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


def read_message(callback: Callback, bot: BotConfig) -> Inbound:
    """The query, command and media of a text, voice, mixed, image, file or video callback."""
    if len(callback.media) > MAX_MIXED_IMAGES:
        return Inbound(text="", refusal=texts.TOO_MANY_IMAGES)
    text = strip_mentions(callback.text) if callback.is_group else callback.text
    text = text.strip()
    if not callback.media and (command := command_of(text, bot)):
        return Inbound(text=text, command=command)
    if callback.quote and text:
        text = f"{text}\n\n（引用的消息：{callback.quote}）"
    return Inbound(text=text, media=callback.media)
