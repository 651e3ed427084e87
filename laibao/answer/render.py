"""What WeCom shows of an answer: reasoning rendered or hidden, cut to 20480 bytes, failures explained.

All of it is pure: no I/O, safe to run on every snapshot of a streaming answer (every poll).
"""

from __future__ import annotations

import re
import unicodedata
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


# ------------------------------------------------------------------------------- the 20480-byte cut

_FENCE_LINE = re.compile(r"[ \t]*(`{3,}|~{3,})(.*)")


def _line_starts(text: str, end: int) -> tuple[list[int], list[int]]:
    """Start offsets of the lines within ``text[:end]`` (not 0), split by lying outside / inside a fence."""
    outside: list[int] = []
    inside: list[int] = []
    fence: tuple[str, int] | None = None
    start = 0
    while start < end:
        newline = text.find("\n", start, end)
        match = _FENCE_LINE.match(text, start, end if newline < 0 else newline)
        if match is not None:
            marker, rest = match.group(1), match.group(2)
            if fence is None:
                if not (marker[0] == "`" and "`" in rest):  # CommonMark: no backtick in a backtick info string
                    fence = (marker[0], len(marker))
            elif marker[0] == fence[0] and len(marker) >= fence[1] and not rest.strip():
                fence = None
        if newline < 0:
            break
        start = newline + 1
        (outside if fence is None else inside).append(start)
    return outside, inside


def _joins_next(text: str, index: int) -> bool:
    """True if cutting before ``text[index]`` would split a user-perceived character."""
    char, before = text[index], text[index - 1]
    return (
        char in "\u200d\ufe0f\ufe0e" or before == "\u200d" or unicodedata.combining(char) != 0
        or (before == "\r" and char == "\n") or 0x1F3FB <= ord(char) <= 0x1F3FF  # skin tone modifiers
    )


def split_for_wecom(text: str, limit: int = MAX_CONTENT_BYTES) -> tuple[str, str]:
    """Cut ``text`` into (head, rest), head at most ``limit`` UTF-8 bytes, at a clean place when there is one."""
    if limit < 4:
        raise ValueError(f"limit must allow one UTF-8 character (4 bytes), not {limit}")
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text, ""
    cut = limit
    while data[cut] & 0xC0 == 0x80:  # a continuation byte: the cut would split a character
        cut -= 1
    end = len(data[:cut].decode("utf-8"))
    for _ in range(8):  # emoji sequences are short; a longer run of joiners is not worth keeping whole
        if end <= 1 or not _joins_next(text, end):
            break
        end -= 1
    outside, inside = _line_starts(text, end)
    floor = max(1, end // 4)  # a head shorter than this wastes the stream: cut inside instead
    if outside and outside[-1] >= floor:
        end = outside[-1]  # a line boundary outside any code block: before a fence's opening line if need be
    elif inside and inside[-1] >= floor:
        end = inside[-1]
    return text[:end], text[end:]


# ------------------------------------------------------------------------------------ reasoning

_THINK_OPEN = re.compile(r"<think>", re.I)
_THINK_CLOSE = re.compile(r"</think>", re.I)
_DETAILS_CLOSE = re.compile(r"</details>", re.I)
# Bounded repeats: on text full of "<details" an unbounded [^>]* would rescan to the end at each one.
_DETAILS_OPEN = re.compile(r"<details\b([^>]{0,256})>\s{0,64}<summary\b[^>]{0,64}>([^<]{0,80})</summary>", re.I)
_TAG_HOLD = 512  # an unfinished <details ...><summary>...</summary> longer than this is not Dify's


def _is_thinking(attributes: str, summary: str) -> bool:
    """Dify's reasoning block: grey and/or summarised "Thinking..." (other <details> are content)."""
    style = re.sub(r"\s+", "", attributes).lower()
    label = summary.strip().lower()
    return "color:gray" in style or label.startswith("thinking") or "思考" in label


def _opening(text: str, at: int, final: bool) -> tuple[re.Pattern[str], int] | bool:
    """At a "<": the close pattern and body start of a reasoning block; True if undecided yet; False if not one."""
    # The few characters every tag needs first: looking further at every "<" costs a long answer dearly.
    head = text[at : at + 9].lower()
    if head.startswith("<think>"):
        return _THINK_CLOSE, at + len("<think>")
    if head.startswith("<details"):
        rest = text[at : at + _TAG_HOLD].lower()
        match = _DETAILS_OPEN.match(text, at)
        if match is not None:
            return (_DETAILS_CLOSE, match.end()) if _is_thinking(match.group(1), match.group(2)) else False
        # Not complete yet, unless it could no longer become one
        return not final and len(text) - at < _TAG_HOLD and "</summary>" not in rest
    if final:
        return False
    # Only a tag cut off by the end of the text is undecided; a complete "</think>" is decided (stray).
    return any(len(head) < len(tag) and tag.startswith(head) for tag in ("<think>", "<details", "</think>"))


def _without_partial_close(body: str, close: str) -> str:
    """``body`` without a trailing beginning of ``close`` (the tag may be arriving in the next chunk)."""
    lowered = body[-len(close):].lower()
    for size in range(min(len(close) - 1, len(lowered)), 0, -1):
        if lowered.endswith(close[:size]):
            return body[:-size]
    return body


def think_blocks(text: str, mode: str, *, final: bool = False) -> str:
    """Show reasoning as WeCom's collapsible ``<think>`` ("show") or remove it ("hide"); streaming-safe.

    Both ``<think>...</think>`` and Dify's ``<details ...><summary> Thinking... </summary>...</details>``
    are recognised. On a partial snapshot an unterminated block stays open (show) or is dropped (hide),
    and an unfinished tag at the very end is held back until it is complete; ``final=True`` says no
    more text follows, so nothing is held back. A ``</think>`` with no opening (models that omit it)
    makes everything before it reasoning.
    """
    if mode not in ("show", "hide"):
        raise ValueError(f"think mode must be 'show' or 'hide', not {mode!r}")
    show = mode == "show"
    out: list[str] = []
    segment = 0  # index in ``out`` where the text after the last reasoning block begins
    position = 0
    # Whether ``out`` already holds visible text: kept as a flag, as joining ``out`` at every "<"
    # made a long answer quadratic.
    visible = 0  # how many pieces of ``out`` were looked at for it
    shown = False
    while position < len(text):
        at = text.find("<", position)
        if at < 0:
            out.append(text[position:])
            break
        out.append(text[position:at])
        opening = _opening(text, at, final)
        if opening is True:
            break  # an unfinished tag at the end: decided when more text arrives
        if opening is False:
            stray = _THINK_CLOSE.match(text, at)
            if stray is None:
                out.append("<")
                position = at + 1
                continue
            reasoning = "".join(out[segment:])
            del out[segment:]
            if show:
                out.append(f"<think>{reasoning}</think>")
            position = stray.end()
        else:
            close, body_start = opening
            end = close.search(text, body_start)
            if end is None:
                if show:
                    body = text[body_start:]
                    out.append("<think>" + (body if final else _without_partial_close(body, close.pattern)))
                break
            if show:
                out.append(f"<think>{text[body_start:end.start()]}</think>")
            position = end.end()
        if not show:
            shown = shown or any(piece.strip() for piece in out[visible:])
            visible = len(out)
            if not shown:
                # An answer that begins with hidden reasoning would begin with the blank lines after it.
                while position < len(text) and text[position].isspace():
                    position += 1
        segment = len(out)
    return "".join(out)
