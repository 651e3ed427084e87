"""Dify's server-sent events: typed events and an incremental, pure parser.

Dify frames every event as ``data: {json}`` followed by a blank line; the only ``event:`` line it sends is
a bare ``event: ping``. Network chunks split anywhere, including inside a JSON object and inside a
multi-byte UTF-8 character, so :class:`SSEParser` buffers bytes, cuts lines and frames, and decodes only
a complete frame. It does no I/O: feed it what the socket delivered, get back the events it completed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from laibao.errors import DifyStreamError
from stores.numbers import ascii_digits

# One frame larger than this is refused: Dify's frames are a few KB; a runaway stream must not eat memory.
MAX_FRAME_BYTES = 4 * 1024 * 1024

# Event names of chatflow / workflow progress (``workflow_started``, ``node_finished``, ``loop_next``, ...).
_WORKFLOW_PREFIXES = ("workflow_", "node_", "iteration_", "loop_", "parallel_")
_WORKFLOW_NAMES = frozenset({"text_chunk", "text_replace", "agent_log"})

_LINE_END = re.compile(rb"\r\n|\r|\n")
_EXCERPT_CHARS = 60


@dataclass(frozen=True)
class DifyEvent:
    """One event of a Dify stream; ``data`` is the whole decoded JSON object."""

    event: str
    conversation_id: str = ""
    message_id: str = ""
    task_id: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ping(DifyEvent):
    """Dify's keep-alive (a bare ``event: ping`` frame)."""


@dataclass(frozen=True)
class MessageDelta(DifyEvent):
    """A piece of the answer (``message``, or ``agent_message`` from agent apps)."""

    answer: str = ""


@dataclass(frozen=True)
class AgentThought(DifyEvent):
    """An agent's reasoning step or tool call."""

    thought: str = ""
    tool: str = ""
    observation: str = ""


@dataclass(frozen=True)
class MessageFile(DifyEvent):
    """A file the app produced (e.g. a generated image) and where to fetch it."""

    file_type: str = ""
    url: str = ""


@dataclass(frozen=True)
class MessageReplace(DifyEvent):
    """Moderation: replace the whole answer shown so far with ``answer``."""

    answer: str = ""


@dataclass(frozen=True)
class MessageEnd(DifyEvent):
    """The answer is complete; ``metadata`` holds ``usage`` and ``retriever_resources``."""

    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorEvent(DifyEvent):
    """Dify failed mid-stream; no ``message_end`` follows."""

    code: str = ""
    status: int = 0
    message: str = ""


@dataclass(frozen=True)
class WorkflowEvent(DifyEvent):
    """Chatflow / workflow progress (``workflow_started``, ``node_finished``, ``text_chunk``, ...)."""


@dataclass(frozen=True)
class TextChunk(WorkflowEvent):
    """A piece of a workflow app's text output (``text_chunk``, ``data.text``)."""

    text: str = ""
    workflow_run_id: str = ""


@dataclass(frozen=True)
class TextReplace(WorkflowEvent):
    """Workflow moderation: replace the whole text shown so far (``text_replace``, ``data.text``)."""

    text: str = ""
    workflow_run_id: str = ""


@dataclass(frozen=True)
class WorkflowFinished(WorkflowEvent):
    """A workflow run ended: ``status`` succeeded / partial-succeeded / failed / stopped, its ``outputs``."""

    status: str = ""
    outputs: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""
    workflow_run_id: str = ""
    files: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class UnknownEvent(DifyEvent):
    """Any other event (``tts_message``, events of future Dify versions); safe to ignore."""


class SSEParser:
    """Incremental SSE parser: ``feed`` raw bytes as they arrive, ``close`` at the end of the stream.

    A :class:`DifyStreamError` it raises is final: the stream cannot be trusted after it.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()  # only the current, unfinished line
        self._scan_from = 0  # the buffer before this offset holds no line end: never rescan it
        self._data: list[bytes] = []  # the current frame's ``data:`` lines
        self._data_bytes = 0
        self._event_name = ""
        self._closed = False

    def feed(self, chunk: bytes) -> list[DifyEvent]:
        """Take the next bytes of the stream; return the events whose frames they completed."""
        if self._closed:
            raise ValueError("SSEParser.feed() after close()")
        buffer = self._buffer
        buffer += chunk
        events: list[DifyEvent] = []
        line_start = 0
        position = self._scan_from
        while True:
            match = _LINE_END.search(buffer, position)
            if match is None:
                position = len(buffer)
                break
            if match.end() == len(buffer) and match.end() - match.start() == 1 and buffer[-1] == 0x0D:
                # A CR as the last byte may be the first half of CRLF: decide when the next byte comes.
                position = match.start()
                break
            event = self._take_line(bytes(buffer[line_start : match.start()]))
            if event is not None:
                events.append(event)
            line_start = position = match.end()
        if line_start:
            del buffer[:line_start]
        self._scan_from = position - line_start
        if self._data_bytes + len(buffer) > self._max_frame_bytes:
            raise DifyStreamError(f"malformed SSE frame: larger than {self._max_frame_bytes} bytes")
        return events

    def close(self) -> list[DifyEvent]:
        """End of stream: return the events of a last frame that lacked its blank line."""
        # Two line ends finish whatever is pending (a lone CR becomes CRLF, which is still one line end);
        # blank lines that complete nothing yield nothing, so whitespace-only leftovers are harmless.
        events = self.feed(b"\n\n")
        self._closed = True
        return events

    def _take_line(self, line: bytes) -> DifyEvent | None:
        if not line:
            return self._dispatch()
        if line[0] == 0x3A:  # ":" starts a comment (proxies' keep-alives)
            return None
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._data_bytes += len(value) + 1
        elif name == b"event":
            self._event_name = value.decode("utf-8", "replace")
        # ``id``, ``retry`` and unknown fields are ignored, as the SSE specification says; Dify sends none.
        return None

    def _dispatch(self) -> DifyEvent | None:
        data, name = self._data, self._event_name
        self._data, self._data_bytes, self._event_name = [], 0, ""
        payload = b"\n".join(data)
        if not payload:
            # Dify's bare ``event: ping``; a frame of only comments or blank data is nothing.
            if name == "ping":
                return Ping(event="ping")
            return UnknownEvent(event=name) if name else None
        return parse_frame_data(payload)


def parse_frame_data(payload: bytes) -> DifyEvent:
    """Decode the joined ``data`` of one complete frame into its typed event."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DifyStreamError(f"malformed SSE frame: data is not UTF-8 ({len(payload)} bytes)") from exc
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # deeply nested data makes json recurse until it gives up
        raise DifyStreamError(f"malformed SSE frame: data is not JSON: {_excerpt(text)}") from exc
    if not isinstance(obj, dict):
        raise DifyStreamError(f"malformed SSE frame: data is not a JSON object: {_excerpt(text)}")
    name = obj.get("event")
    if not isinstance(name, str) or not name:
        raise DifyStreamError(f"malformed SSE frame: no event name: {_excerpt(text)}")
    return _typed_event(name, obj)


def _typed_event(name: str, obj: dict[str, Any]) -> DifyEvent:
    ids: dict[str, Any] = {
        "event": name,
        "conversation_id": _text(obj, "conversation_id"),
        "message_id": _text(obj, "message_id"),
        "task_id": _text(obj, "task_id"),
        "data": obj,
    }
    if name in ("message", "agent_message"):
        return MessageDelta(**ids, answer=_text(obj, "answer"))
    if name == "message_end":
        metadata = obj.get("metadata")
        return MessageEnd(**ids, metadata=metadata if isinstance(metadata, dict) else {})
    if name == "agent_thought":
        return AgentThought(
            **ids,
            thought=_text(obj, "thought"),
            tool=_text(obj, "tool"),
            observation=_text(obj, "observation"),
        )
    if name == "message_file":
        return MessageFile(**ids, file_type=_text(obj, "type"), url=_text(obj, "url"))
    if name == "message_replace":
        return MessageReplace(**ids, answer=_text(obj, "answer"))
    if name == "error":
        return ErrorEvent(
            **ids, code=_text(obj, "code"), status=_number(obj, "status"), message=_text(obj, "message")
        )
    if name == "ping":
        return Ping(**ids)
    if name in ("text_chunk", "text_replace", "workflow_finished"):
        return _workflow_event(name, obj, ids)
    if name.startswith(_WORKFLOW_PREFIXES) or name in _WORKFLOW_NAMES:
        return WorkflowEvent(**ids)
    return UnknownEvent(**ids)


def _workflow_event(name: str, obj: dict[str, Any], ids: dict[str, Any]) -> DifyEvent:
    """The workflow events whose ``data`` the client reads, typed; their fields live under ``data``."""
    data = obj.get("data")
    inner: Mapping[str, Any] = data if isinstance(data, dict) else {}
    run_id = _text(obj, "workflow_run_id") or _text(inner, "workflow_run_id")
    if name == "text_chunk":
        return TextChunk(**ids, text=_text(inner, "text"), workflow_run_id=run_id)
    if name == "text_replace":
        return TextReplace(**ids, text=_text(inner, "text"), workflow_run_id=run_id)
    outputs = inner.get("outputs")
    files = inner.get("files")
    return WorkflowFinished(
        **ids,
        status=_text(inner, "status"),
        outputs=outputs if isinstance(outputs, dict) else {},
        error=_text(inner, "error"),
        workflow_run_id=run_id or _text(inner, "id"),
        files=tuple(f for f in files if isinstance(f, dict)) if isinstance(files, list) else (),
    )


def _text(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _number(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and ascii_digits(value, 9):
        return int(value)
    return 0


def _excerpt(text: str) -> str:
    """A short, quoted start of a payload: enough to recognise it, never the whole of it."""
    if len(text) <= _EXCERPT_CHARS:
        return repr(text)
    return f"{text[:_EXCERPT_CHARS]!r}... ({len(text)} chars)"
