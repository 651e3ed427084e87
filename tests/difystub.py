"""A Dify stand-in for tests: real HTTP on 127.0.0.1, real SSE framing, scripted answers.

    stub = DifyStub()
    await stub.start()
    stub.push(Script(answer="你好", stall_after=1))   # how to answer the next streaming request
    ...                                               # point laibao (or DifyClient) at stub.base_url
    stub.chat_calls[-1].json                          # what Dify received
    await stub.stop()

``stub.mode`` is the app type ``/info`` reports ("chat" by default; "agent-chat", "advanced-chat",
"completion", "workflow"), and like Dify the stub refuses an endpoint of another app type with 400
``not_chat_app`` / ``not_completion_app`` / ``not_workflow_app``. A script is consumed by each
streaming request (/chat-messages, /completion-messages, /workflows/run) that passes the stub's own
checks (bearer key, app mode, required fields, conversation ownership, known upload ids); requests
refused by those checks do not consume one.

Beyond streaming it answers the stop routes of each app type, ``/files/upload`` (multipart; see
``uploads``, ``upload_limit``, ``allowed_upload_types``), ``/parameters`` (``parameters``),
``/messages/{id}/feedbacks`` (``feedbacks``), ``/messages/{id}/suggested`` (``suggested_questions``),
``DELETE /conversations/{id}``, and serves ``static`` files at ``{origin}/files/{name}`` without a
key (Dify's signed file URLs; also a stand-in for WeCom's media server). Besides ``api_key`` it accepts
any bearer token in ``user_tokens`` (per-user token mode).

Standalone, for manual tries and benchmarks: ``python -m tests.difystub --port 8089 [--answer TEXT]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.iostream import StreamClosedError

DEFAULT_ANSWER = "你好！这是来自 Dify 的回答。Hello from the stand-in."
PING = b"event: ping\n\n"
# How Dify 0.15 wrapped a reasoning model's thinking before it streamed <think> tags.
DETAILS_OPEN = ('<details style="color:gray;background-color: #f8f8f8;padding: 8px;border-radius: 4px;" open> '
                "<summary> Thinking... </summary>")
DETAILS_CLOSE = "</details>"
CHAT_MODES = frozenset({"chat", "agent-chat", "advanced-chat"})
MODE_ERRORS = {"chat": "not_chat_app", "completion": "not_completion_app", "workflow": "not_workflow_app"}
DEFAULT_SUGGESTIONS = ["能再详细一点吗？", "有具体的例子吗？", "还有别的办法吗？"]
# Character counts the default answer is split into, cycled: deltas of varying size, as an LLM gives.
_DELTA_SIZES = (3, 1, 4, 1, 5, 9, 2, 6)
_DEFAULT_ERRORS = {
    400: ("invalid_param", "Bad request."),
    401: ("unauthorized", "Access token is invalid"),
    403: ("forbidden", "App is disabled."),
    404: ("not_found", "Not found."),
    429: ("too_many_requests", "Too many requests, please try again later."),
    500: ("internal_server_error", "Internal Server Error."),
}


@dataclass
class Script:
    """How to answer ONE streaming request (any app type); the defaults give a normal streamed answer."""

    answer: str = DEFAULT_ANSWER
    deltas: list[str] | None = None  # explicit answer pieces; default: ``answer`` split into varying sizes
    cut: Sequence[int] = (1, 7, 3, 13, 2, 29, 5)  # sizes of the raw writes (cycled), each flushed
    event: str = "message"  # "agent_message" for agent apps
    ping_first: bool = True  # send "event: ping\n\n" first
    delay: float = 0.0  # seconds between writes
    first_byte_delay: float = 0.0  # seconds before anything (headers included) is sent
    http_status: int = 200  # >= 400: answer with ``error_body`` instead of a stream
    error_body: bytes | None = None  # default: Dify-style JSON for ``http_status``
    error_event: dict[str, Any] | None = None  # an ``error`` frame after the deltas instead of message_end
    replace_with: str | None = None  # a message_replace with this text after the deltas
    eof_without_end: bool = False  # end the body after the deltas with no terminal event
    stall_after: int | None = None  # after this many deltas go silent (connection open) until released
    malformed: bool = False  # a frame whose data is not JSON, after the deltas
    hold: asyncio.Event | None = None  # wait for it before the terminal event (lets tests poll mid-answer)
    ping_every: float = 0.0  # while waiting on ``hold``, send a ping every this many seconds (0: never)
    files: list[str] = field(default_factory=list)  # URLs of generated images: message_file events
    think: str = ""  # reasoning, sent as a "<think>...</think>" prefix of the answer deltas
    think_format: str = "think"  # "details": Dify's collapsible <details>...</details> block instead
    text_chunks: bool = True  # workflow: False sends no text_chunk (the answer is only in the outputs)
    outputs: dict[str, Any] | None = None  # workflow outputs; default {"text": the whole answer}
    workflow_error: str | None = None  # workflow: end with workflow_finished status "failed" and this error

    def reasoning(self) -> str:
        """The reasoning prefix of the answer ("" without ``think``)."""
        if not self.think:
            return ""
        if self.think_format == "details":
            return DETAILS_OPEN + self.think + DETAILS_CLOSE
        return f"<think>{self.think}</think>"

    def pieces(self) -> list[str]:
        """The answer deltas this script sends."""
        if self.deltas is not None:
            return _split(self.reasoning()) + list(self.deltas)
        return _split(self.reasoning() + self.answer)

    def full_answer(self) -> str:
        """Everything the deltas add up to."""
        return "".join(self.pieces())


def _split(text: str) -> list[str]:
    """``text`` in deltas of varying size, as an LLM gives them."""
    pieces: list[str] = []
    rest = text
    for size in itertools.cycle(_DELTA_SIZES):
        if not rest:
            return pieces
        pieces.append(rest[:size])
        rest = rest[size:]
    raise AssertionError("unreachable")


@dataclass
class RecordedRequest:
    """One request as the stub received it."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any  # the parsed body, or None when it was empty or not JSON
    form: dict[str, Any] | None = None  # multipart: text fields, and "file" as {filename, content_type, size}
    query: dict[str, str] = field(default_factory=dict)  # the query string's arguments


@dataclass
class Upload:
    """One file received by /files/upload."""

    id: str
    name: str
    size: int
    mime_type: str
    user: str
    data: bytes
    extension: str


@dataclass
class _Run:
    """One streaming answer in progress."""

    task_id: str
    user: str
    kind: str = "chat"
    released: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    ending: str = ""  # "stopped" (by /stop), "gone" (client left), "closing" (stub stops)
    finished: bool = False  # the terminal event has been (or is being) sent

    def end(self, why: str) -> None:
        if not self.ending:
            self.ending = why
            self.ended.set()


class _Gone(Exception):
    """The client went away (or the stub is stopping): stop writing."""


class DifyStub:
    """An in-process Dify stand-in on the current IOLoop."""

    def __init__(self, api_key: str = "app-test-key") -> None:
        self.api_key = api_key
        self.user_tokens: set[str] = set()  # bearer tokens accepted besides the app key
        self.mode = "chat"  # the app type /info reports; endpoints of other types answer 400
        self.default = Script()
        self.answer_for: Callable[[str], Script] | None = None  # a script per query, once the queue is empty
        self.requests: list[RecordedRequest] = []
        self.stops: list[str] = []
        self.disconnects = 0
        self.uploads: list[Upload] = []
        self.upload_limit: int | None = None  # larger uploads get 413 file_too_large
        self.allowed_upload_types: set[str] | None = None  # extensions or MIME types; others get 415
        self.parameters: dict[str, Any] = default_parameters()
        self.feedbacks: list[dict[str, Any]] = []  # {"message_id", "rating", "user", "content"}
        self.feedback_requests = 0  # feedback requests received, recorded or not
        self.hold_first_feedback: asyncio.Event | None = None  # when set: the first one waits for it
        self.suggested_questions: list[str] | None = list(DEFAULT_SUGGESTIONS)  # None: disabled (400)
        self.delete_status = 204  # what DELETE /conversations answers (older Dify: 200 with JSON)
        self.static: dict[str, tuple[bytes, str]] = {}  # /files/{name} -> (body, content type)
        self.static_chunked = True  # serve static files in flushed pieces without Content-Length
        self.static_aborts = 0  # static downloads the client left before the end
        self._scripts: collections.deque[Script] = collections.deque()
        self._conversations: dict[str, str] = {}  # conversation id -> user
        self._messages: dict[str, str] = {}  # message id -> user
        self._runs: dict[str, _Run] = {}
        self._server: tornado.httpserver.HTTPServer | None = None
        self._port = 0
        self._closing = False

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1 (a free port unless ``port`` is given) on the current IOLoop."""
        app = tornado.web.Application(
            [
                (r"/v1/chat-messages", _StreamHandler, {"stub": self, "kind": "chat"}),
                (r"/v1/completion-messages", _StreamHandler, {"stub": self, "kind": "completion"}),
                (r"/v1/workflows/run", _StreamHandler, {"stub": self, "kind": "workflow"}),
                (r"/v1/chat-messages/([^/]+)/stop", _StopHandler, {"stub": self, "kind": "chat"}),
                (r"/v1/completion-messages/([^/]+)/stop", _StopHandler, {"stub": self, "kind": "completion"}),
                (r"/v1/workflows/tasks/([^/]+)/stop", _StopHandler, {"stub": self, "kind": "workflow"}),
                (r"/v1/info", _InfoHandler, {"stub": self}),
                (r"/v1/parameters", _ParametersHandler, {"stub": self}),
                (r"/v1/files/upload", _UploadHandler, {"stub": self}),
                (r"/v1/messages/([^/]+)/feedbacks", _FeedbackHandler, {"stub": self}),
                (r"/v1/messages/([^/]+)/suggested", _SuggestedHandler, {"stub": self}),
                (r"/v1/conversations/([^/]+)", _ConversationHandler, {"stub": self}),
                (r"/files/(.+)", _StaticHandler, {"stub": self}),
            ],
            default_handler_class=_NotFoundHandler,
            default_handler_args={"stub": self},
        )
        sockets = tornado.netutil.bind_sockets(port, "127.0.0.1", family=socket.AF_INET)
        self._port = int(sockets[0].getsockname()[1])
        self._server = tornado.httpserver.HTTPServer(app)
        self._server.add_sockets(sockets)
        self._closing = False

    async def stop(self) -> None:
        """Stop listening, end every open stream (releasing stalls and holds) and close connections."""
        self._closing = True
        for run in list(self._runs.values()):
            run.end("closing")
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None
        for _ in range(500):  # handlers leave within a few loop turns once their runs are ended
            if not self._runs:
                break
            await asyncio.sleep(0.01)

    @property
    def origin(self) -> str:
        """Scheme, host and port ("http://127.0.0.1:PORT"): where Dify's "/files/..." URLs live."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def base_url(self) -> str:
        """The Dify base URL to configure, ending in /v1."""
        return f"{self.origin}/v1"

    @property
    def chat_calls(self) -> list[RecordedRequest]:
        """The POST /chat-messages requests received, in order."""
        return self.calls("POST", "/v1/chat-messages")

    @property
    def completion_calls(self) -> list[RecordedRequest]:
        """The POST /completion-messages requests received, in order."""
        return self.calls("POST", "/v1/completion-messages")

    @property
    def workflow_calls(self) -> list[RecordedRequest]:
        """The POST /workflows/run requests received, in order."""
        return self.calls("POST", "/v1/workflows/run")

    def calls(self, method: str, path: str) -> list[RecordedRequest]:
        """The requests received with this method and path (without query string), in order."""
        return [r for r in self.requests if r.method == method and r.path == path]

    def serve(self, name: str, body: bytes, content_type: str = "application/octet-stream") -> str:
        """Serve ``body`` at /files/{name}; return its absolute URL."""
        self.static[name] = (body, content_type)
        return f"{self.origin}/files/{name}"

    def push(self, *scripts: Script) -> None:
        """Queue scripts for the next chat requests, in order (``default`` answers once they are used)."""
        self._scripts.extend(scripts)

    def release(self) -> None:
        """Let every stalled (or about to stall) open stream go on."""
        for run in self._runs.values():
            run.released.set()

    def forget_conversations(self) -> None:
        """Forget every conversation, as if they were deleted: their ids now answer 404."""
        self._conversations.clear()

    def _next_script(self, query: str = "") -> Script:
        if self._scripts:
            return self._scripts.popleft()
        return self.answer_for(query) if self.answer_for is not None else self.default


def default_parameters() -> dict[str, Any]:
    """What GET /parameters answers by default: files of every type accepted, Dify's default size limits (MB)."""
    return {
        "opening_statement": "",
        "suggested_questions": [],
        "suggested_questions_after_answer": {"enabled": True},
        "speech_to_text": {"enabled": False},
        "text_to_speech": {"enabled": False},
        "retriever_resource": {"enabled": True},
        "annotation_reply": {"enabled": False},
        "more_like_this": {"enabled": False},
        "user_input_form": [],
        "sensitive_word_avoidance": {"enabled": False},
        "file_upload": {
            "enabled": True,
            "allowed_file_types": ["image", "document", "audio", "video"],
            "allowed_file_extensions": [],
            "allowed_file_upload_methods": ["local_file", "remote_url"],
            "number_limits": 3,
            "image": {"enabled": True, "number_limits": 3, "detail": "high",
                      "transfer_methods": ["local_file", "remote_url"]},
        },
        "system_parameters": {
            "image_file_size_limit": 10,
            "file_size_limit": 15,
            "audio_file_size_limit": 50,
            "video_file_size_limit": 100,
            "workflow_file_upload_limit": 10,
        },
    }


class _RecordingHandler(tornado.web.RequestHandler):
    """Records every request."""

    def initialize(self, stub: DifyStub) -> None:
        self.stub = stub
        self.body_json: Any = None

    def prepare(self) -> None:
        form: dict[str, Any] | None = None
        if self.request.headers.get("Content-Type", "").startswith("multipart/form-data"):
            form = {name: values[0].decode("utf-8", "replace")
                    for name, values in self.request.body_arguments.items()}
            for name, files in self.request.files.items():
                form[name] = {"filename": files[0].filename, "content_type": files[0].content_type,
                              "size": len(files[0].body)}
        else:
            try:
                self.body_json = json.loads(self.request.body) if self.request.body else None
            except ValueError:
                self.body_json = None
        query = {name: values[0].decode("utf-8", "replace") for name, values in self.request.query_arguments.items()}
        self.stub.requests.append(
            RecordedRequest(self.request.method or "", self.request.path, dict(self.request.headers),
                            self.body_json, form, query)
        )

    def fail(self, status: int, code: str, message: str) -> None:
        """Answer the way Dify answers errors."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"code": code, "message": message, "status": status}))

    def check_xsrf_cookie(self) -> None:
        """An API, not a form: no XSRF."""


class _StubHandler(_RecordingHandler):
    """Records the request and checks the bearer key (the app key, or one of ``user_tokens``)."""

    def prepare(self) -> None:
        super().prepare()
        token = self.request.headers.get("Authorization", "")
        if token != f"Bearer {self.stub.api_key}" and token.removeprefix("Bearer ") not in self.stub.user_tokens:
            self.fail(401, "unauthorized", "Access token is invalid")

    def wrong_mode(self, kind: str) -> bool:
        """Refuse (as Dify does) an endpoint of another app type; True if refused."""
        fits = self.stub.mode in CHAT_MODES if kind == "chat" else self.stub.mode == kind
        if not fits:
            self.fail(400, MODE_ERRORS[kind], "Please check if your app mode matches the right API route.")
        return not fits

    def body_user(self) -> str | None:
        """The JSON body's ``user``, or None after answering 400."""
        body = self.body_json if isinstance(self.body_json, dict) else {}
        user = body.get("user")
        if not isinstance(user, str) or not user:
            self.fail(400, "invalid_param", "user is required")
            return None
        return user


class _NotFoundHandler(_StubHandler):
    def prepare(self) -> None:
        super().prepare()
        if not self._finished:
            self.fail(404, "not_found", "The requested URL was not found on the server.")


class _InfoHandler(_StubHandler):
    def get(self) -> None:
        self.finish({"name": "stub", "mode": self.stub.mode})


class _ParametersHandler(_StubHandler):
    def get(self) -> None:
        self.finish(self.stub.parameters)


class _StopHandler(_StubHandler):
    def initialize(self, stub: DifyStub, kind: str = "chat") -> None:
        super().initialize(stub)
        self.kind = kind

    def post(self, task_id: str) -> None:
        if self.wrong_mode(self.kind):
            return
        user = self.body_user()
        if user is None:
            return
        self.stub.stops.append(task_id)
        run = self.stub._runs.get(task_id)
        if run is not None and run.user == user:
            run.end("stopped")
        self.finish({"result": "success"})


class _UploadHandler(_StubHandler):
    def post(self) -> None:
        files = self.request.files.get("file") or []
        if not files:
            self.fail(400, "no_file_uploaded", "Please upload your file.")
            return
        if len(files) > 1 or len(self.request.files) > 1:
            self.fail(400, "too_many_files", "Only one file is allowed.")
            return
        user = self.get_body_argument("user", "")
        if not user:
            self.fail(400, "invalid_param", "user is required")
            return
        upload = files[0]
        extension = upload.filename.rsplit(".", 1)[-1].lower() if "." in upload.filename else ""
        limit = self.stub.upload_limit
        if limit is not None and len(upload.body) > limit:
            self.fail(413, "file_too_large", f"File size exceeded. {len(upload.body)} > {limit}")
            return
        allowed = self.stub.allowed_upload_types
        if allowed is not None and extension not in allowed and upload.content_type not in allowed:
            self.fail(415, "unsupported_file_type", "File type not allowed.")
            return
        record = Upload(id=str(uuid.uuid4()), name=upload.filename, size=len(upload.body),
                        mime_type=upload.content_type, user=user, data=upload.body, extension=extension)
        self.stub.uploads.append(record)
        self.set_status(201)
        self.finish({"id": record.id, "name": record.name, "size": record.size, "extension": extension,
                     "mime_type": record.mime_type, "created_by": str(uuid.uuid5(uuid.NAMESPACE_URL, user)),
                     "created_at": int(time.time())})


class _FeedbackHandler(_StubHandler):
    async def post(self, message_id: str) -> None:
        self.stub.feedback_requests += 1
        if self.stub.feedback_requests == 1 and self.stub.hold_first_feedback is not None:
            await self.stub.hold_first_feedback.wait()
        user = self.body_user()
        if user is None:
            return
        body = self.body_json
        rating = body.get("rating")
        if rating not in ("like", "dislike", None):
            self.fail(400, "invalid_param", "rating must be like, dislike or null")
            return
        if self.stub._messages.get(message_id) != user:
            self.fail(404, "not_found", "Message Not Exists.")
            return
        self.stub.feedbacks.append({"message_id": message_id, "rating": rating, "user": user,
                                    "content": body.get("content") or ""})
        self.finish({"result": "success"})


class _SuggestedHandler(_StubHandler):
    def get(self, message_id: str) -> None:
        user = self.get_query_argument("user", "")
        if not user:
            self.fail(400, "invalid_param", "user is required")
            return
        if self.stub._messages.get(message_id) != user:
            self.fail(404, "not_found", "Message Not Exists.")
            return
        if self.stub.suggested_questions is None:
            self.fail(400, "bad_request", "Suggested Questions Is Disabled.")
            return
        self.finish({"result": "success", "data": list(self.stub.suggested_questions)})


class _ConversationHandler(_StubHandler):
    def delete(self, conversation_id: str) -> None:
        if self.wrong_mode("chat"):
            return
        user = self.body_user()
        if user is None:
            return
        if self.stub._conversations.get(conversation_id) != user:
            self.fail(404, "not_found", "Conversation Not Exists.")
            return
        del self.stub._conversations[conversation_id]
        if self.stub.delete_status == 200:
            self.finish({"result": "success"})
        else:
            self.set_status(self.stub.delete_status)
            self.finish()


class _StaticHandler(_RecordingHandler):
    """Dify's signed file URLs (no key), and a stand-in for WeCom's media server."""

    async def get(self, name: str) -> None:
        item = self.stub.static.get(name)
        if item is None:
            self.fail(404, "not_found", "File not found.")
            return
        body, content_type = item
        self.set_header("Content-Type", content_type)
        if not self.stub.static_chunked:
            self.finish(body)
            return
        try:
            for start in range(0, len(body), 16384):
                self.write(body[start : start + 16384])
                await self.flush()
                await asyncio.sleep(0)  # let the client read (and refuse) each piece
        except StreamClosedError:
            self.stub.static_aborts += 1
            return
        self.finish()


class _StreamHandler(_StubHandler):
    """The streaming endpoints: /chat-messages, /completion-messages and /workflows/run (``kind``)."""

    run: _Run | None = None

    def initialize(self, stub: DifyStub, kind: str = "chat") -> None:
        super().initialize(stub)
        self.kind = kind

    async def post(self) -> None:
        if self.wrong_mode(self.kind):
            return
        body = self.body_json
        if not isinstance(body, dict):
            self.fail(400, "invalid_param", "The request body must be a JSON object.")
            return
        required = ("inputs", "query", "user") if self.kind == "chat" else ("inputs", "user")
        for name in required:
            if name not in body:
                self.fail(400, "invalid_param", f"{name} is required")
                return
        user = str(body["user"])
        conversation = str(body.get("conversation_id") or "") if self.kind == "chat" else ""
        if conversation and self.stub._conversations.get(conversation) != user:
            self.fail(404, "not_found", "Conversation Not Exists.")
            return
        known = {upload.id for upload in self.stub.uploads}
        for file in body.get("files") or []:
            if file.get("transfer_method") == "local_file" and file.get("upload_file_id") not in known:
                self.fail(400, "invalid_param", "Invalid upload file id.")
                return
        script = self.stub._next_script(str(body.get("query") or ""))
        writer = _CutWriter(self, script)
        try:
            if script.http_status >= 400:
                await self._error_answer(script, writer)
                return
            if self.kind == "chat" and not conversation:
                conversation = str(uuid.uuid4())
                self.stub._conversations[conversation] = user
            self.run = _Run(task_id=str(uuid.uuid4()), user=user, kind=self.kind)
            self.stub._runs[self.run.task_id] = self.run
            try:
                await self._stream(script, writer, self.run, conversation)
            finally:
                del self.stub._runs[self.run.task_id]
        except _Gone:
            return

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.gone()

    def gone(self) -> None:
        """The client left: count it once if the answer was not finished, and wake any wait."""
        run = self.run
        if run is None or run.ending:
            return
        if not run.finished:
            self.stub.disconnects += 1
        run.end("gone")

    async def _error_answer(self, script: Script, writer: _CutWriter) -> None:
        status = script.http_status
        body = script.error_body
        if body is None:
            code, message = _DEFAULT_ERRORS.get(status, ("error", "Error."))
            body = json.dumps({"code": code, "message": message, "status": status}).encode()
        try:
            json.loads(body)
            content_type = "application/json"
        except ValueError:
            content_type = "text/html" if body.lstrip().startswith(b"<") else "text/plain"
        self.set_status(status, reason=_reason(status))
        self.set_header("Content-Type", content_type)
        self.set_header("Content-Length", str(len(body)))
        await writer.send(body)
        await writer.drain()

    def _ids(self, run: _Run, conversation: str) -> dict[str, Any]:
        """The id fields every content frame of this kind carries."""
        created = int(time.time())
        if self.kind == "workflow":
            return {"task_id": run.task_id, "workflow_run_id": str(uuid.uuid4()), "created_at": created}
        message_id = str(uuid.uuid4())
        self.stub._messages[message_id] = run.user
        ids = {"task_id": run.task_id, "id": message_id, "message_id": message_id, "created_at": created}
        if self.kind == "chat":
            ids["conversation_id"] = conversation
        return ids

    async def _stream(self, script: Script, writer: _CutWriter, run: _Run, conversation: str) -> None:
        content_ids = self._ids(run, conversation)
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        if script.first_byte_delay:
            await _first_of(run.ended, seconds=script.first_byte_delay)
        if script.ping_first:
            await writer.send(PING)
        workflow = self.kind == "workflow"
        if workflow:
            for frame in _workflow_start(content_ids):
                await writer.send(frame)
        deltas = script.pieces()
        for index, delta in enumerate(deltas):
            if index == script.stall_after:
                await self._stall(writer, run)
            if run.ending:
                break
            if not workflow:
                await writer.send(_frame({"event": script.event, **content_ids, "answer": delta}))
            elif script.text_chunks:
                await writer.send(_frame({"event": "text_chunk", **content_ids,
                                          "data": {"text": delta, "from_variable_selector": ["llm", "text"]}}))
        else:
            if script.stall_after is not None and script.stall_after >= len(deltas):
                await self._stall(writer, run)
        if script.hold is not None and not run.ending:
            await writer.drain()
            while not (script.hold.is_set() or run.ending):
                await _first_of(script.hold, run.ended, seconds=script.ping_every or None)
                if script.ping_every and not (script.hold.is_set() or run.ending):
                    await writer.send(PING)
                    await writer.drain()
        if run.ending in ("gone", "closing"):
            raise _Gone
        run.finished = True
        if script.malformed and run.ending != "stopped":
            await writer.send(b"data: {\"event\": \"message\", this is not JSON\n\n")
        if run.ending == "stopped":
            await writer.send(self._end(content_ids, script, deltas, stopped=True))
        elif script.error_event is not None:
            error = {"status": 500, "code": "internal_server_error", "message": "stub error"}
            await writer.send(_frame({**content_ids, **error, **script.error_event, "event": "error"}))
        elif not script.eof_without_end:
            if script.replace_with is not None:
                if workflow:
                    await writer.send(_frame({"event": "text_replace", **content_ids,
                                              "data": {"text": script.replace_with}}))
                else:
                    await writer.send(_frame({"event": "message_replace", **content_ids,
                                              "answer": script.replace_with}))
            if not workflow:
                for url in script.files:
                    await writer.send(_frame({"event": "message_file", "id": str(uuid.uuid4()), "type": "image",
                                              "belongs_to": "assistant", "url": url,
                                              **{k: v for k, v in content_ids.items() if k == "conversation_id"}}))
            await writer.send(self._end(content_ids, script, deltas, stopped=False))
        await writer.drain()

    async def _stall(self, writer: _CutWriter, run: _Run) -> None:
        await writer.drain()
        await _first_of(run.released, run.ended)

    def _end(self, content_ids: dict[str, Any], script: Script, deltas: list[str], stopped: bool) -> bytes:
        """The terminal frame(s): message_end, or node_finished + workflow_finished."""
        if self.kind != "workflow":
            return self._message_end(content_ids, deltas)
        answer = "".join(deltas)
        outputs: dict[str, Any]
        if stopped:
            status, error, outputs = "stopped", "Workflow execution stopped by user.", {}
        elif script.workflow_error is not None:
            status, error, outputs = "failed", script.workflow_error, {}
        else:
            status, error = "succeeded", None
            outputs = {"text": answer} if script.outputs is None else script.outputs
        files = [] if stopped or script.workflow_error is not None else [_workflow_file(url) for url in script.files]
        run_id = content_ids["workflow_run_id"]
        node = {"event": "node_finished", **content_ids,
                "data": {"id": str(uuid.uuid4()), "node_id": "llm", "node_type": "llm", "title": "LLM", "index": 2,
                         "status": "failed" if error and not stopped else "succeeded", "outputs": outputs,
                         "error": error, "elapsed_time": 0.01}}
        finished = {"event": "workflow_finished", **content_ids,
                    "data": {"id": run_id, "workflow_id": "wf-stub", "status": status, "outputs": outputs,
                             "error": error, "elapsed_time": 0.02, "total_tokens": 12 + len(answer),
                             "total_steps": 3, "created_at": content_ids["created_at"],
                             "finished_at": int(time.time()), "files": files}}
        return _frame(node) + _frame(finished)

    @staticmethod
    def _message_end(content_ids: dict[str, Any], deltas: list[str]) -> bytes:
        completion = sum(len(d) for d in deltas)
        usage = {"prompt_tokens": 12, "completion_tokens": completion, "total_tokens": 12 + completion,
                 "currency": "USD", "total_price": "0", "latency": 0.01}
        metadata = {"usage": usage, "retriever_resources": []}
        return _frame({"event": "message_end", **content_ids, "metadata": metadata, "files": []})


def _workflow_start(content_ids: dict[str, Any]) -> list[bytes]:
    run_id = content_ids["workflow_run_id"]
    started = {"event": "workflow_started", **content_ids,
               "data": {"id": run_id, "workflow_id": "wf-stub", "sequence_number": 1, "inputs": {},
                        "created_at": content_ids["created_at"]}}
    node = {"event": "node_started", **content_ids,
            "data": {"id": str(uuid.uuid4()), "node_id": "llm", "node_type": "llm", "title": "LLM", "index": 2,
                     "created_at": content_ids["created_at"]}}
    return [_frame(started), _frame(node)]


def _workflow_file(url: str) -> dict[str, Any]:
    """A generated image as Dify lists it in workflow_finished.data.files."""
    name = url.split("?", 1)[0].rsplit("/", 1)[-1]
    return {"dify_model_identity": "__dify__file__", "id": None, "type": "image", "transfer_method": "tool_file",
            "remote_url": None, "related_id": str(uuid.uuid4()), "filename": name,
            "extension": "." + name.rsplit(".", 1)[-1] if "." in name else "", "mime_type": "image/png",
            "size": 0, "url": url}


class _CutWriter:
    """Writes the raw bytes in pieces of the script's ``cut`` sizes (cycled), flushing each one."""

    def __init__(self, handler: _StreamHandler, script: Script) -> None:
        if not script.cut or any(size < 1 for size in script.cut):
            raise ValueError(f"cut sizes must be positive: {script.cut!r}")
        self._handler = handler
        self._delay = script.delay
        self._sizes = itertools.cycle(script.cut)
        self._next = next(self._sizes)
        self._pending = bytearray()
        self._wrote = False

    async def send(self, data: bytes) -> None:
        """Queue ``data``; write every full piece (a piece may span two frames)."""
        self._pending += data
        while len(self._pending) >= self._next:
            piece = bytes(self._pending[: self._next])
            del self._pending[: self._next]
            self._next = next(self._sizes)
            await self._emit(piece)

    async def drain(self) -> None:
        """Write what is queued, even if shorter than the next piece size (before waiting, at the end)."""
        if self._pending:
            piece = bytes(self._pending)
            self._pending.clear()
            await self._emit(piece)

    async def _emit(self, piece: bytes) -> None:
        run = self._handler.run
        if self._wrote and self._delay:
            if run is None:
                await asyncio.sleep(self._delay)
            else:
                await _first_of(run.ended, seconds=self._delay)
        if run is not None and run.ending in ("gone", "closing"):
            raise _Gone
        self._handler.write(piece)
        try:
            await self._handler.flush()
        except StreamClosedError:
            self._handler.gone()
            raise _Gone from None
        self._wrote = True
        if not self._delay:
            # A flush to a local socket completes at once; yield so the client reads each piece separately.
            await asyncio.sleep(0)


async def _first_of(*events: asyncio.Event, seconds: float | None = None) -> None:
    """Wait until one of ``events`` is set, or ``seconds`` passed."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


def _frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


async def _serve(port: int, api_key: str, answer: str | None, cut: tuple[int, ...], mode: str = "chat") -> None:
    stub = DifyStub(api_key)
    stub.mode = mode
    stub.default = Script(answer=DEFAULT_ANSWER if answer is None else answer, cut=cut)
    await stub.start(port)
    print(f"Dify stand-in ({mode} app) at {stub.base_url} (key {api_key}); Ctrl-C stops it", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await stub.stop()


def main(argv: list[str] | None = None) -> None:
    """Run the stand-in until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m tests.difystub", description="A Dify stand-in.")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--answer", help="the default answer text")
    parser.add_argument("--key", default="app-test-key", help="the API key to accept")
    parser.add_argument("--cut", default="1,7,3,13,2,29,5",
                        help="comma-separated write sizes in bytes (e.g. 65536 for benchmarks)")
    parser.add_argument("--mode", default="chat", choices=sorted(CHAT_MODES | set(MODE_ERRORS)),
                        help="the app type /info reports")
    args = parser.parse_args(argv)
    cut = tuple(int(size) for size in args.cut.split(","))
    try:
        asyncio.run(_serve(args.port, args.key, args.answer, cut, args.mode))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
