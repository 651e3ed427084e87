"""The SSE parser: the same events whatever the byte cuts, CRLF / CR framing, and malformed input refused."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from laibao.errors import DifyStreamError
from laibao.sse import (
    MAX_FRAME_BYTES,
    AgentThought,
    DifyEvent,
    ErrorEvent,
    MessageDelta,
    MessageEnd,
    MessageFile,
    MessageReplace,
    Ping,
    SSEParser,
    TextChunk,
    TextReplace,
    UnknownEvent,
    WorkflowEvent,
    WorkflowFinished,
)

CONV = "45701982-8118-4bc5-8e9b-64562b4555f2"
MSG = "9da23599-e713-473b-982c-4328d4f5c78a"
TASK = "5ad4cb98-f0c7-4085-b384-88c403be6290"
IDS = {"conversation_id": CONV, "message_id": MSG, "task_id": TASK, "created_at": 1705395332}

# What a chatflow / agent answer looks like on the wire, in the order Dify sends it.
OBJECTS: list[dict[str, Any]] = [
    {"event": "workflow_started", **IDS, "workflow_run_id": "wr-1",
     "data": {"id": "wr-1", "sequence_number": 1}},
    {"event": "node_started", **IDS, "workflow_run_id": "wr-1", "data": {"node_id": "llm", "title": "LLM"}},
    {"event": "message", **IDS, "id": MSG, "answer": "你好！"},
    {"event": "message", **IDS, "id": MSG, "answer": "我是来宝 🤖，"},
    {"event": "message", **IDS, "id": MSG, "answer": "emoji 👨‍👩‍👧‍👦 and «quotes» \"escaped\"\n新行"},
    {"event": "agent_thought", **IDS, "id": "th-1", "position": 1, "thought": "查一下天气",
     "tool": "weather", "tool_input": "{\"city\": \"北京\"}", "observation": "晴，25°C"},
    {"event": "agent_message", **IDS, "id": MSG, "answer": "北京今天晴。"},
    {"event": "message_file", "conversation_id": CONV, "id": "f-1", "type": "image",
     "belongs_to": "assistant", "url": "https://dify.example/files/f-1.png"},
    {"event": "node_finished", **IDS, "workflow_run_id": "wr-1",
     "data": {"node_id": "llm", "status": "succeeded"}},
    {"event": "tts_message", **IDS, "audio": "UklGRg=="},
    {"event": "message_replace", **IDS, "answer": "该内容已被替换。"},
    {"event": "workflow_finished", **IDS, "workflow_run_id": "wr-1", "data": {"status": "succeeded"}},
    {"event": "message_end", **IDS, "id": MSG,
     "metadata": {"usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}},
]


def _frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


RECORDED = (
    b"event: ping\n\n"
    + b"".join(_frame(o) for o in OBJECTS[:5])
    + b": a proxy's keep-alive\n\n"
    + b"event: ping\n\n"
    + b"".join(_frame(o) for o in OBJECTS[5:])
)
EXPECTED_TYPES = [
    Ping, WorkflowEvent, WorkflowEvent, MessageDelta, MessageDelta, MessageDelta, Ping, AgentThought,
    MessageDelta, MessageFile, WorkflowEvent, UnknownEvent, MessageReplace, WorkflowFinished, MessageEnd,
]


def parse(stream: bytes, cuts: list[int]) -> list[DifyEvent]:
    """Feed ``stream`` cut at the given offsets, then close."""
    parser = SSEParser()
    events: list[DifyEvent] = []
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        events += parser.feed(stream[start:cut])
        start = max(start, cut)
    return events + parser.close()


EXPECTED = parse(RECORDED, [])


def test_recorded_stream_gives_typed_events() -> None:
    assert [type(e) for e in EXPECTED] == EXPECTED_TYPES
    ping, started = EXPECTED[0], EXPECTED[1]
    assert ping == Ping(event="ping")
    assert (started.event, started.task_id) == ("workflow_started", TASK)
    assert started.data["data"]["sequence_number"] == 1
    deltas = [e for e in EXPECTED if isinstance(e, MessageDelta)]
    assert "".join(d.answer for d in deltas) == (
        "你好！我是来宝 🤖，emoji 👨‍👩‍👧‍👦 and «quotes» \"escaped\"\n新行北京今天晴。"
    )
    assert [d.event for d in deltas] == ["message"] * 3 + ["agent_message"]
    assert all((d.conversation_id, d.message_id, d.task_id) == (CONV, MSG, TASK) for d in deltas)
    thought = next(e for e in EXPECTED if isinstance(e, AgentThought))
    assert (thought.thought, thought.tool, thought.observation) == ("查一下天气", "weather", "晴，25°C")
    file = next(e for e in EXPECTED if isinstance(e, MessageFile))
    assert (file.file_type, file.url) == ("image", "https://dify.example/files/f-1.png")
    assert file.conversation_id == CONV
    assert next(e for e in EXPECTED if isinstance(e, UnknownEvent)).event == "tts_message"
    replace = next(e for e in EXPECTED if isinstance(e, MessageReplace))
    assert replace.answer == "该内容已被替换。"
    end = EXPECTED[-1]
    assert isinstance(end, MessageEnd)
    assert end.metadata["usage"]["total_tokens"] == 30
    assert (end.conversation_id, end.message_id, end.task_id) == (CONV, MSG, TASK)
    assert end.data == OBJECTS[-1]


def test_every_single_cut_point_gives_the_same_events() -> None:
    for cut in range(len(RECORDED) + 1):
        assert parse(RECORDED, [cut]) == EXPECTED, cut


def test_byte_by_byte() -> None:
    assert parse(RECORDED, list(range(len(RECORDED)))) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(RECORDED)), max_size=40))
def test_random_multi_cuts(cuts: list[int]) -> None:
    assert parse(RECORDED, cuts) == EXPECTED


@pytest.mark.parametrize("line_end", [b"\r\n", b"\r"], ids=["crlf", "cr"])
def test_crlf_and_cr_framing_at_every_cut(line_end: bytes) -> None:
    # JSON escapes newlines inside strings, so every raw LF in the recording is framing.
    stream = RECORDED.replace(b"\n", line_end)
    for cut in range(len(stream) + 1):
        assert parse(stream, [cut]) == EXPECTED, cut
    assert parse(stream, list(range(len(stream)))) == EXPECTED


@given(st.lists(st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=1, max_size=8),
       st.lists(st.integers(min_value=0, max_value=2 * len(RECORDED)), max_size=20))
def test_mixed_line_ends(line_ends: list[bytes], cuts: list[int]) -> None:
    pieces = RECORDED.split(b"\n")
    stream = pieces[0]
    for i, piece in enumerate(pieces[1:]):
        line_end = line_ends[i % len(line_ends)]
        if stream.endswith(b"\r") and line_end == b"\n":
            line_end = b"\r\n"  # CR then LF would be one CRLF line end, not two
        stream += line_end + piece
    assert parse(stream, [c for c in cuts if c <= len(stream)]) == EXPECTED


def test_multi_line_data_is_joined_with_newlines() -> None:
    stream = b'data: {"event": "message",\ndata:"answer": "a",\ndata:  "task_id": "t"}\n\n'
    (event,) = parse(stream, [])
    assert event == MessageDelta(event="message", task_id="t",
                                 data={"event": "message", "answer": "a", "task_id": "t"}, answer="a")


def test_multi_line_frames_with_crlf_at_every_cut() -> None:
    # A CRLF split between two feeds must stay one line end, or a frame would end after its first line.
    stream = (b'data: {"event": "message",\r\ndata: "answer": "\xe4\xb8\x80"}\r\n\r\n'
              b'event: ping\r\n: comment\r\n\r\n')
    expected = [MessageDelta(event="message", data={"event": "message", "answer": "一"}, answer="一"),
                Ping(event="ping")]
    for cut in range(len(stream) + 1):
        assert parse(stream, [cut]) == expected, cut


def test_comments_blank_lines_and_unknown_fields_are_ignored() -> None:
    frame = _frame({"event": "message", "answer": "x"})
    stream = b": hello\n\n\n\nid: 7\nretry: 100\n: inside a frame\n" + frame
    assert [(type(e), getattr(e, "answer", None)) for e in parse(stream, [])] == [(MessageDelta, "x")]


def test_error_event_fields() -> None:
    frame = _frame({"event": "error", **IDS, "status": 400, "code": "completion_request_error",
                    "message": "boom"})
    (event,) = parse(frame, [])
    assert isinstance(event, ErrorEvent)
    assert (event.code, event.status, event.message) == ("completion_request_error", 400, "boom")
    assert event.task_id == TASK


@pytest.mark.parametrize("status", ["²", "9" * 5000, "-1", "4OO"])
def test_an_error_status_that_is_no_small_ascii_number_is_zero(status: str) -> None:
    (event,) = parse(_frame({"event": "error", **IDS, "status": status, "code": "c", "message": "m"}), [])
    assert isinstance(event, ErrorEvent) and event.status == 0


def test_close_parses_a_last_frame_without_its_blank_line() -> None:
    end = _frame(OBJECTS[-1])[:-2]
    for tail in (b"", b"\n", b"\r", b"\r\n"):
        parser = SSEParser()
        assert parser.feed(end + tail) == []
        (event,) = parser.close()
        assert isinstance(event, MessageEnd)
    parser = SSEParser()
    assert parser.feed(b"event: ping") == []
    assert parser.close() == [Ping(event="ping")]


def test_close_with_whitespace_leftovers_is_fine() -> None:
    for leftover in (b"", b"\n", b"  ", b"\r\n\r\n", b"\n \t"):
        parser = SSEParser()
        parser.feed(_frame(OBJECTS[2]))
        assert parser.feed(leftover) == []
        assert parser.close() == []


def test_truncated_last_frame_at_close_is_malformed() -> None:
    parser = SSEParser()
    parser.feed(_frame(OBJECTS[-1])[:40])
    with pytest.raises(DifyStreamError, match="malformed SSE frame"):
        parser.close()


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b'{"event": "message", "answer": "\xe4\xbd"}', "not UTF-8"),
        (b'{"event": "message", "answer": ' + b'"x' * 5000, "not JSON"),
        (b"[1, 2, 3]", "not a JSON object"),
        (b'{"answer": "' + b"y" * 5000 + b'"}', "no event name"),
        (b'{"event": 42}', "no event name"),
        (b"[DONE]", "not JSON"),
    ],
    ids=["bad-utf8", "not-json", "array", "no-event", "event-not-string", "openai-done"],
)
def test_malformed_frames_raise_without_echoing_the_payload(data: bytes, why: str) -> None:
    parser = SSEParser()
    with pytest.raises(DifyStreamError, match=f"^malformed SSE frame: (data is )?{why}") as info:
        parser.feed(b"data: " + data + b"\n\n")
    assert len(str(info.value)) < 200
    assert info.value.code == ""


def test_a_utf8_character_split_across_feeds_is_fine_but_not_inside_a_frame() -> None:
    frame = _frame({"event": "message", "answer": "汉"})
    middle = frame.index("汉".encode()) + 1
    parser = SSEParser()
    assert parser.feed(frame[:middle]) == []
    (event,) = parser.feed(frame[middle:])
    assert isinstance(event, MessageDelta) and event.answer == "汉"


def test_oversized_frame_is_refused() -> None:
    parser = SSEParser()
    line = b"data: " + b"x" * 65536 + b"\n"
    with pytest.raises(DifyStreamError, match="larger than"):
        for _ in range(MAX_FRAME_BYTES // 65536 + 2):
            parser.feed(line)
    # A single line with no end counts too.
    parser = SSEParser(max_frame_bytes=1000)
    parser.feed(b"data: " + b"x" * 900)
    with pytest.raises(DifyStreamError, match="larger than 1000 bytes"):
        parser.feed(b"x" * 200)


def test_a_large_frame_in_small_chunks_is_linear() -> None:
    # A parser that rescans its buffer on every feed takes minutes here; a linear one, milliseconds.
    answer = "长" * (1 << 18)
    frame = _frame({"event": "message", "answer": answer})
    parser = SSEParser()
    events: list[DifyEvent] = []
    started = time.monotonic()
    for start in range(0, len(frame), 16):
        events += parser.feed(frame[start : start + 16])
    assert time.monotonic() - started < 10
    assert [e.answer for e in events if isinstance(e, MessageDelta)] == [answer]


def test_feed_after_close_is_a_bug() -> None:
    parser = SSEParser()
    parser.close()
    with pytest.raises(ValueError, match="after close"):
        parser.feed(b"data: {}\n\n")


def test_workflow_events_are_typed_from_their_data() -> None:
    run = {"task_id": TASK, "workflow_run_id": "wr-9"}
    outputs = {"text": "结果", "count": 3}
    files = [{"type": "image", "url": "/files/tools/x.png?sign=s"}, "not-a-file"]
    objects: list[dict[str, Any]] = [
        {"event": "text_chunk", **run, "data": {"text": "片段", "from_variable_selector": ["llm", "text"]}},
        {"event": "text_replace", **run, "data": {"text": "替换"}},
        {"event": "workflow_finished", **run,
         "data": {"id": "wr-9", "status": "succeeded", "outputs": outputs, "error": None, "files": files}},
        {"event": "workflow_finished", "task_id": TASK,
         "data": {"id": "wr-10", "status": "failed", "outputs": None, "error": "节点失败"}},
        {"event": "text_chunk", "data": "not an object"},
    ]
    stream = b"".join(_frame(o) for o in objects)
    chunk, replace, finished, failed, odd = parse(stream, [])
    assert isinstance(chunk, TextChunk) and (chunk.text, chunk.workflow_run_id) == ("片段", "wr-9")
    assert chunk.task_id == TASK and isinstance(chunk, WorkflowEvent)
    assert isinstance(replace, TextReplace) and replace.text == "替换"
    assert isinstance(finished, WorkflowFinished)
    assert (finished.status, finished.outputs, finished.error) == ("succeeded", outputs, "")
    assert finished.workflow_run_id == "wr-9"
    assert finished.files == (files[0],)
    assert isinstance(failed, WorkflowFinished)
    assert (failed.status, failed.outputs, failed.error, failed.workflow_run_id) == ("failed", {}, "节点失败", "wr-10")
    assert isinstance(odd, TextChunk) and odd.text == ""
