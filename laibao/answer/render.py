"""What WeCom shows of an answer: reasoning rendered or hidden, cut to 20480 bytes, failures explained."""

from __future__ import annotations

import uuid

from laibao import texts
from laibao.config import BotConfig
from laibao.errors import (
    AuthError,
    DifyHTTPError,
    MediaError,
    MediaTooLarge,
    MediaUnsupported,
    NotAuthorized,
)
from laibao.media import split_for_wecom, think_blocks
from laibao.wecom import MAX_CONTENT_BYTES


def render_answer(text: str, think: str, final: bool, cut: bool = True) -> tuple[str, str]:
    """(what the stream shows, what must follow via response_url) for an answer's raw text.

    Reasoning is shown as WeCom's <think> or hidden; an answer over 20480 UTF-8 bytes shows its first
    part with a note saying the rest follows (``cut=False``: the whole rendered text, nothing after).
    """
    # Every reasoning form starts with "<": most answers skip the parser (this runs on every poll).
    content = think_blocks(text, think, final=final) if "<" in text else text
    return fit(content, texts.OVERFLOW_NOTE) if cut else (content, "")


def fit(content: str, note: str) -> tuple[str, str]:
    """(content cut to WeCom's 20480 bytes, the rest); when cut, ``note`` ends the shown part."""
    head, rest = split_for_wecom(content)
    if not rest:
        return head, ""
    tail = "\n\n" + note
    head, rest = split_for_wecom(content, MAX_CONTENT_BYTES - len(tail.encode("utf-8")))
    return head + tail, rest


def explain_failure(exc: Exception, bot: BotConfig) -> str:
    """The short sentence a user sees for a failed answer, media and sign-in included."""
    if isinstance(exc, NotAuthorized):
        return bot.denied_text
    if isinstance(exc, AuthError):
        return texts.SIGN_IN_FAILED
    if isinstance(exc, MediaTooLarge):
        return texts.MEDIA_TOO_LARGE
    if isinstance(exc, MediaUnsupported):
        return texts.MEDIA_UNSUPPORTED
    if isinstance(exc, MediaError):
        return texts.MEDIA_UNAVAILABLE
    if isinstance(exc, DifyHTTPError) and exc.status == 413:
        return texts.MEDIA_TOO_LARGE
    if isinstance(exc, DifyHTTPError) and exc.status == 415:
        return texts.MEDIA_UNSUPPORTED
    return texts.explain(exc)


def new_id() -> str:
    """A new stream id."""
    return uuid.uuid4().hex
