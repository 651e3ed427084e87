"""The WeCom AI-bot message model: decrypted callbacks in, passive replies out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from laibao.errors import CallbackError

MAX_CONTENT_BYTES = 20480
MAX_FEEDBACK_ID_BYTES = 256
MAX_USERID_BYTES = 64  # WeCom's userids are 1-64 bytes (and the users table holds VARCHAR(64))
MAX_ID_BYTES = 128  # msgid, aibotid, chatid, a stream id, an event type
MAX_URL_BYTES = 4096  # media URLs and response_url (signed, so long, but bounded)
CHAT_TYPES = ("single", "group")


@dataclass(frozen=True)
class Feedback:
    """A user's rating of an answer (``feedback_event``); its id is the feedback id laibao gave the stream."""

    id: str
    type: int | None = None  # 1 like, 2 dislike, 3 cancelled; None when WeCom sent none
    reasons: tuple[int, ...] = ()  # inaccurate_reason_list
    content: str = ""


@dataclass(frozen=True)
class Callback:
    """One decrypted WeCom callback, reduced to what laibao acts on: nothing reads the JSON after this."""

    msgtype: str
    msgid: str = ""
    aibotid: str = ""
    chattype: str = "single"
    chatid: str = ""
    userid: str = ""
    response_url: str = ""
    text: str = ""  # text.content, voice.content (already transcribed), or a mixed message's text items
    media: tuple[Mapping[str, str], ...] = ()  # {"kind", "url"[, "aeskey"]}: the file, or a mixed message's images
    quote: str = ""  # the text of the quoted message (text, voice, or a mixed message's text items)
    stream_id: str = ""  # msgtype "stream": the refresh poll's stream id
    event_type: str = ""  # msgtype "event": event.eventtype
    feedback: Feedback | None = None  # event_type "feedback_event"

    @property
    def is_group(self) -> bool:
        """True for a group chat."""
        return self.chattype == "group"


def _text(value: Any, where: str, max_bytes: int | None = None) -> str:
    """``value`` if it is a string that UTF-8 can carry (no lone surrogates) within ``max_bytes``."""
    if not isinstance(value, str):
        raise CallbackError(f"field {where} is not a string")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        # JSON's \ud800 escapes decode to lone surrogates, which Redis, MySQL and Dify cannot take.
        raise CallbackError(f"field {where} is not valid Unicode") from None
    if max_bytes is not None and size > max_bytes:
        raise CallbackError(f"field {where} is longer than {max_bytes} bytes")
    return value


def _str_at(obj: Mapping[str, Any], *path: str, max_bytes: int | None = None) -> str:
    """The string at ``obj[path[0]][path[1]]...``, or "" when absent; CallbackError when not a usable string."""
    value: Any = obj
    for key in path:
        if not isinstance(value, Mapping):
            return ""
        value = value.get(key)
        if value is None:
            return ""
    return _text(value, ".".join(path), max_bytes)


def _object(value: Any, where: str) -> Mapping[str, Any]:
    """``value`` if it is a JSON object ({} when absent)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise CallbackError(f"field {where} is not an object")
    return value


def _media(body: Mapping[str, Any], kind: str) -> list[Mapping[str, str]]:
    """The file of a media body as a media entry (none without a URL), with the item's own ``aeskey`` when it
    has one (long-connection mode encrypts each item with its own)."""
    url = _str_at(body, "url", max_bytes=MAX_URL_BYTES)
    if not url:
        return []
    entry = {"kind": kind, "url": url}
    if key := _str_at(body, "aeskey", max_bytes=MAX_ID_BYTES):
        entry["aeskey"] = key
    return [entry]


def _mixed(body: Mapping[str, Any], where: str) -> tuple[str, list[Mapping[str, str]]]:
    """A mixed message's ``msg_item``, a list of text and image items: its text items joined, its images."""
    items = body.get("msg_item")
    if items is None:
        return "", []
    if not isinstance(items, list):
        raise CallbackError(f"field {where}.msg_item is not a list")
    texts: list[str] = []
    images: list[Mapping[str, str]] = []
    for index, item in enumerate(items):
        at = f"{where}.msg_item[{index}]"
        item = _object(item, at)
        kind = _str_at(item, "msgtype", max_bytes=MAX_ID_BYTES)
        if kind == "text":
            texts.append(_str_at(_object(item.get("text"), at + ".text"), "content"))
        elif kind == "image":
            images += _media(_object(item.get("image"), at + ".image"), "image")
    return " ".join(text for text in texts if text), images


def _content(obj: Mapping[str, Any], msgtype: str, where: str) -> tuple[str, list[Mapping[str, str]]]:
    """The text and the media of one message body (``obj[msgtype]``), types and lengths checked."""
    body = _object(obj.get(msgtype), f"{where}{msgtype}")
    if msgtype in ("text", "voice"):
        return _str_at(body, "content"), []
    if msgtype in ("image", "file", "video"):
        return "", _media(body, msgtype)
    if msgtype == "mixed":
        return _mixed(body, f"{where}mixed")
    return "", []


def _feedback(obj: Mapping[str, Any]) -> Feedback:
    """A feedback_event: id and content strings, type and reasons integers."""
    feedback = _object(_object(obj.get("event"), "event").get("feedback_event"), "event.feedback_event")
    kind = feedback.get("type")
    if kind is not None and (not isinstance(kind, int) or isinstance(kind, bool)):
        raise CallbackError("field event.feedback_event.type is not an integer")
    reasons = feedback.get("inaccurate_reason_list")
    if reasons is not None and (
        not isinstance(reasons, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in reasons)
    ):
        raise CallbackError("field event.feedback_event.inaccurate_reason_list is not a list of integers")
    return Feedback(id=_str_at(feedback, "id", max_bytes=MAX_FEEDBACK_ID_BYTES), type=kind,
                    reasons=tuple(reasons or ()), content=_str_at(feedback, "content", max_bytes=MAX_CONTENT_BYTES))


def parse_callback(obj: Mapping[str, Any]) -> Callback:
    """Turn decrypted callback JSON into a Callback; CallbackError when it is not a usable message.

    The one place the JSON is read: types, lengths and valid Unicode are checked as each field is taken.
    """
    msgtype = _str_at(obj, "msgtype", max_bytes=MAX_ID_BYTES)
    if not msgtype:
        raise CallbackError("callback has no msgtype")
    text, media = _content(obj, msgtype, "")
    quote = _object(obj.get("quote"), "quote")
    quoted = _content(quote, _str_at(quote, "msgtype", max_bytes=MAX_ID_BYTES), "quote.")[0] if quote else ""
    stream_id = _str_at(obj, "stream", "id", max_bytes=MAX_ID_BYTES) if msgtype == "stream" else ""
    if msgtype == "stream" and not stream_id:
        raise CallbackError("stream refresh without stream.id")
    event_type = _str_at(obj, "event", "eventtype", max_bytes=MAX_ID_BYTES) if msgtype == "event" else ""
    feedback = _feedback(obj) if event_type == "feedback_event" else None
    chattype = _str_at(obj, "chattype", max_bytes=MAX_ID_BYTES) or "single"
    if chattype not in CHAT_TYPES:
        raise CallbackError("field chattype is neither single nor group")
    callback = Callback(
        msgtype=msgtype,
        msgid=_str_at(obj, "msgid", max_bytes=MAX_ID_BYTES),
        aibotid=_str_at(obj, "aibotid", max_bytes=MAX_ID_BYTES),
        chattype=chattype,
        chatid=_str_at(obj, "chatid", max_bytes=MAX_ID_BYTES),
        userid=_str_at(obj, "from", "userid", max_bytes=MAX_USERID_BYTES),
        response_url=_str_at(obj, "response_url", max_bytes=MAX_URL_BYTES),
        text=text,
        media=tuple(media),
        quote=quoted.strip(),
        stream_id=stream_id,
        event_type=event_type,
        feedback=feedback,
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
