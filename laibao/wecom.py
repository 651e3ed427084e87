"""The WeCom AI-bot message model: decrypted callbacks in, passive replies out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from laibao.errors import CallbackError

MAX_CONTENT_BYTES = 20480
MAX_FEEDBACK_ID_BYTES = 256


@dataclass(frozen=True)
class Callback:
    """One decrypted WeCom callback, reduced to what laibao acts on."""

    msgtype: str
    msgid: str = ""
    aibotid: str = ""
    chattype: str = "single"
    chatid: str = ""
    userid: str = ""
    response_url: str = ""
    text: str = ""  # text.content, or voice.content (already transcribed)
    stream_id: str = ""  # msgtype "stream": the refresh poll's stream id
    event_type: str = ""  # msgtype "event": event.eventtype
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_group(self) -> bool:
        """True for a group chat."""
        return self.chattype == "group"


def _str_at(obj: Mapping[str, Any], *path: str) -> str:
    """The string at ``obj[path[0]][path[1]]...``, or "" when absent; CallbackError when not a string."""
    value: Any = obj
    for key in path:
        if not isinstance(value, Mapping):
            return ""
        value = value.get(key)
        if value is None:
            return ""
    if not isinstance(value, str):
        raise CallbackError(f"field {'.'.join(path)} is not a string")
    return value


def parse_callback(obj: Mapping[str, Any]) -> Callback:
    """Turn decrypted callback JSON into a Callback; CallbackError when it is not a usable message."""
    msgtype = _str_at(obj, "msgtype")
    if not msgtype:
        raise CallbackError("callback has no msgtype")
    text = ""
    if msgtype == "text":
        text = _str_at(obj, "text", "content")
    elif msgtype == "voice":
        text = _str_at(obj, "voice", "content")
    stream_id = _str_at(obj, "stream", "id") if msgtype == "stream" else ""
    if msgtype == "stream" and not stream_id:
        raise CallbackError("stream refresh without stream.id")
    event_type = _str_at(obj, "event", "eventtype") if msgtype == "event" else ""
    callback = Callback(
        msgtype=msgtype,
        msgid=_str_at(obj, "msgid"),
        aibotid=_str_at(obj, "aibotid"),
        chattype=_str_at(obj, "chattype") or "single",
        chatid=_str_at(obj, "chatid"),
        userid=_str_at(obj, "from", "userid"),
        response_url=_str_at(obj, "response_url"),
        text=text,
        stream_id=stream_id,
        event_type=event_type,
        raw=obj,
    )
    if msgtype not in ("stream", "event") and not callback.msgid:
        raise CallbackError(f"{msgtype} message without msgid")
    if msgtype not in ("stream",) and not callback.userid:
        raise CallbackError(f"{msgtype} callback without from.userid")
    return callback


def cap_utf8(text: str, limit: int = MAX_CONTENT_BYTES) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding fits in ``limit`` bytes."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", errors="ignore")


def stream_reply(stream_id: str, content: str, finish: bool, feedback_id: str | None = None) -> dict[str, Any]:
    """A passive stream reply; ``content`` is the whole text so far, capped at 20480 UTF-8 bytes."""
    stream: dict[str, Any] = {"id": stream_id, "finish": finish, "content": cap_utf8(content)}
    if feedback_id:
        stream["feedback"] = {"id": cap_utf8(feedback_id, MAX_FEEDBACK_ID_BYTES)}
    return {"msgtype": "stream", "stream": stream}


def text_reply(content: str) -> dict[str, Any]:
    """A plain text reply (allowed only for the enter_chat event)."""
    return {"msgtype": "text", "text": {"content": cap_utf8(content)}}
