"""Dify's Service API through :mod:`laibao.outbound`: every app type's streaming answer,
stop, file upload, parameters, feedback, conversation deletion, and file downloads.

Every app type answers through :meth:`DifyClient.chat_stream` with the same event shapes: a workflow
app's ``text_chunk`` / ``text_replace`` / ``workflow_finished`` become MessageDelta / MessageReplace /
MessageEnd here, so the relay never needs to know which kind of app it talks to.

Failures are mapped onto :mod:`laibao.errors` here, with ``raise ... from exc``:

    DifyHTTPError        Dify answered 3xx/4xx/5xx (its JSON ``code``/``message``, or a short excerpt)
    DifyConnectionError  refused, DNS, reset before any answer
    DifyTimeoutError     "connect" (no connection in time), "idle" (no byte for ``idle_timeout``; pings
                         count), "total" (the ``request_timeout`` ceiling)
    DifyStreamError      malformed SSE, an ``error`` event, or the stream ending without ``message_end``

``fetch`` (Dify's file URLs) raises the :mod:`laibao.media` errors instead: it downloads media from
Dify's own origin (or ``file_hosts``) only, and never sends the API key (those URLs are signed).

Every request goes through :class:`laibao.outbound.Outbound`, which owns Tornado's client, its limits
and its errors; short answers (/info, /parameters, ...) are bounded there at about 1 MB. No message or
log line carries the API key or a per-user bearer token.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from laibao.errors import (
    DifyConnectionError,
    DifyError,
    DifyHTTPError,
    DifyStreamError,
    DifyTimeoutError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamTooLarge,
)
from laibao.media import fetch_media
from laibao.outbound import Exchange, HostAllowlist, Outbound, origin_entry, parse_json
from laibao.sse import (
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
    WorkflowFinished,
)

log = logging.getLogger("laibao.dify")

# App modes as GET /info reports them, and the streaming endpoint / stop route of each.
CHAT_MODES = frozenset({"chat", "agent-chat", "advanced-chat"})
COMPLETION = "completion"
WORKFLOW = "workflow"
APP_MODES = CHAT_MODES | {COMPLETION, WORKFLOW}

_SHORT_CALL_TIMEOUT = 30.0  # ceiling for stop / info / parameters ...: small JSON answers, not streams
_UPLOAD_TIMEOUT = 300.0  # an upload of WeCom's largest file (100 MB) over a modest link
# Workflow run statuses that end a run without failing it ("stopped" keeps the partial answer, as a
# stopped chat does).
_WORKFLOW_ENDED = frozenset({"succeeded", "partial-succeeded", "stopped"})
_MESSAGE_CHARS = 200  # at most this much of an error body goes into an exception message
_ERROR_BODY_BYTES = 64 * 1024  # what is read of an error body before giving up on the rest
# Error codes Dify documents, and the ones laibao derives from a status: the only metric labels besides
# the exception's class (no code) and "other" (any other code), so an upstream cannot grow the label set.
KNOWN_ERROR_CODES = frozenset({
    "unauthorized", "forbidden", "not_found", "invalid_param", "bad_request", "app_unavailable",
    "provider_not_initialize", "provider_quota_exceeded", "model_currently_not_support",
    "completion_request_error", "conversation_completed", "rate_limit_error", "too_many_requests",
    "internal_server_error", "bad_gateway", "service_unavailable", "gateway_timeout", "file_too_large",
    "unsupported_file_type", "workflow_failed", "invalid_api_key", "app_disabled",
})
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")
_MIME = re.compile(r"[\w.+-]+/[\w.+-]+")


class DifyClient:
    """A client of one Dify app (one API key)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        http: Outbound | None = None,
        connect_timeout: float = 10.0,
        idle_timeout: float = 90.0,
        total_timeout: float = 1200.0,
        file_hosts: Sequence[str] = (),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._http = http
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.total_timeout = total_timeout
        # Files Dify points to are fetched from its own origin only (plus hosts the operator lists).
        self.files = HostAllowlist("Dify files", (origin_entry(self.base_url), *file_hosts))

    def __repr__(self) -> str:
        return f"DifyClient({self.base_url!r})"

    @property
    def http(self) -> Outbound:
        """The HTTP clients; a private pair trusting only this Dify's host unless some were given."""
        if self._http is None:
            # Created on first use, inside the running loop, never at import time.
            self._http = Outbound(trusted=[urlsplit(self.base_url).hostname or ""])
        return self._http

    async def chat_stream(
        self,
        *,
        query: str,
        user: str,
        conversation_id: str = "",
        inputs: Mapping[str, Any] | None = None,
        files: Sequence[Mapping[str, Any]] | None = None,
        mode: str = "chat",
        bearer: str | None = None,
    ) -> AsyncGenerator[DifyEvent, None]:
        """Ask Dify; yield the answer's events (pings excepted) up to and including ``message_end``.

        ``mode`` is the app's mode from ``GET /info``; completion and workflow apps get ``query`` as
        ``inputs["query"]`` and have no conversation. ``bearer`` replaces the app key for this call.
        """
        path, terminal = _stream_route(mode)
        payload: dict[str, Any] = {"inputs": dict(inputs or {}), "response_mode": "streaming", "user": user}
        if mode in CHAT_MODES:
            payload["query"] = query
            payload["conversation_id"] = conversation_id
        else:
            payload["inputs"]["query"] = query
        if files is not None:
            payload["files"] = [dict(item) for item in files]
        body = json.dumps(payload, ensure_ascii=False).encode()
        headers = self._headers(bearer)
        headers["Accept"] = "text/event-stream"
        exchange = self.http.open_stream(self.base_url + path, headers=headers, body=body,
                                         connect_timeout=self.connect_timeout, timeout=self.total_timeout,
                                         idle_timeout=self.idle_timeout)
        parser = SSEParser()
        workflow = _WorkflowAnswer() if mode == WORKFLOW else None
        try:
            while True:
                try:
                    chunk = await exchange.receive()
                except UpstreamError as exc:
                    raise self._transport_error(exchange, exc) from exc
                if not 200 <= exchange.status < 300:
                    raise await self._error_from_body(exchange, chunk)
                events = parser.feed(chunk) if chunk else parser.close()
                for raw in events:
                    if isinstance(raw, Ping):
                        continue  # only keeps the idle watchdog quiet, which counts bytes
                    if isinstance(raw, ErrorEvent):
                        raise DifyStreamError(
                            raw.message or "Dify sent an error event", code=raw.code, status=raw.status
                        )
                    for event in workflow.translate(raw) if workflow is not None else (raw,):
                        yield event
                        if isinstance(event, MessageEnd):
                            return
                if not chunk:
                    raise DifyStreamError(f"Dify stream ended without {terminal}")
        finally:
            # Runs on message_end, on errors and when the consumer leaves early (aclose, break,
            # cancellation): a stream still open is closed now, so Dify sees the client go away.
            await exchange.abort()

    async def stop(self, task_id: str, user: str, mode: str = "chat", bearer: str | None = None) -> None:
        """Ask Dify to stop generating the answer of ``task_id``; its stream then ends normally."""
        _stream_route(mode)  # refuses an unknown mode
        task = quote(task_id, safe="")
        if mode == WORKFLOW:
            path = f"/workflows/tasks/{task}/stop"
        elif mode == COMPLETION:
            path = f"/completion-messages/{task}/stop"
        else:
            path = f"/chat-messages/{task}/stop"
        await self._call("POST", path, {"user": user}, bearer)

    async def info(self) -> dict[str, Any]:
        """The app's basic information (``name``, ``mode``, ...); used by health checks."""
        return _json_object(await self._call("GET", "/info", None), "/info")

    async def parameters(self, bearer: str | None = None) -> dict[str, Any]:
        """The app's settings (``opening_statement``, ``suggested_questions``, ``file_upload``, limits).

        ``opening_statement`` is always a string and ``suggested_questions`` a list of strings, whatever
        Dify sent (anything else reads as none).
        """
        answer = _json_object(await self._call("GET", "/parameters", None, bearer), "/parameters")
        opening = answer.get("opening_statement")
        questions = answer.get("suggested_questions")
        answer["opening_statement"] = opening if isinstance(opening, str) else ""
        answer["suggested_questions"] = (
            [q for q in questions if isinstance(q, str)] if isinstance(questions, list) else []
        )
        return answer

    async def feedback(
        self, message_id: str, rating: str | None, user: str, content: str = "", bearer: str | None = None
    ) -> None:
        """Rate an answer: ``rating`` "like", "dislike", or None to take a rating back."""
        if rating not in ("like", "dislike", None):
            raise ValueError(f"rating must be 'like', 'dislike' or None, not {rating!r}")
        payload = {"rating": rating, "user": user, "content": content}
        await self._call("POST", f"/messages/{quote(message_id, safe='')}/feedbacks", payload, bearer)

    async def delete_conversation(self, conversation_id: str, user: str, bearer: str | None = None) -> bool:
        """Delete a conversation in Dify; False if Dify does not know it (for this user), which is no error."""
        try:
            await self._call("DELETE", f"/conversations/{quote(conversation_id, safe='')}", {"user": user}, bearer)
        except DifyHTTPError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def upload_file(
        self,
        data: bytes,
        filename: str,
        mime_type: str,
        user: str,
        bearer: str | None = None,
        *,
        time_limit: float = _UPLOAD_TIMEOUT,
    ) -> dict[str, Any]:
        """Upload a file for ``user``; Dify's answer (``id``, ``name``, ``size``, ``extension``, ``mime_type``)."""
        boundary = uuid.uuid4().hex
        body = _multipart(boundary, {"user": user}, "file", filename, mime_type, data)
        headers = self._headers(bearer)
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        try:
            answer = _json_object(
                await self._call("POST", "/files/upload", None, bearer, body=body, headers=headers,
                                 time_limit=time_limit),
                "/files/upload",
            )
        except DifyHTTPError as exc:
            # A proxy in front of Dify answers 413 itself, in HTML: the status is what counts.
            if exc.status == 413:
                raise DifyHTTPError(413, "file_too_large", exc.message) from exc
            if exc.status == 415:
                raise DifyHTTPError(415, "unsupported_file_type", exc.message) from exc
            raise
        if not isinstance(answer.get("id"), str) or not answer["id"]:
            raise DifyError("Dify /files/upload answered without a file id")
        return answer

    def resolve(self, url: str) -> str:
        """An absolute URL for a URL Dify gave (its files come as "/files/..." paths on its origin)."""
        parts = urlsplit(self.base_url)
        return urljoin(f"{parts.scheme}://{parts.netloc}/", url)

    def is_own_url(self, url: str) -> bool:
        """True if ``url`` (after :meth:`resolve`) is on Dify's own origin, e.g. a file Dify generated."""
        ours, theirs = urlsplit(self.base_url), urlsplit(self.resolve(url))
        return (ours.scheme, ours.netloc) == (theirs.scheme, theirs.netloc)

    async def fetch(
        self,
        url: str,
        max_bytes: int,
        timeout: float,  # noqa: ASYNC109 - Tornado's request_timeout
    ) -> tuple[bytes, str]:
        """Download a file Dify points to (relative URLs on Dify's origin); (body, Content-Type).

        Only Dify's origin (and ``file_hosts``) is fetched from, redirects included. Raises
        :class:`~laibao.media.MediaTooLarge` past ``max_bytes`` and :class:`~laibao.media.MediaUnavailable`
        otherwise; no API key is sent.
        """
        return await fetch_media(self.http, self.resolve(url), self.files, max_bytes, timeout,
                                 connect_timeout=self.connect_timeout)

    async def _call(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None,
        bearer: str | None = None,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        time_limit: float = _SHORT_CALL_TIMEOUT,
    ) -> bytes:
        """One short request (a JSON ``payload`` or a ready ``body``); its answer body, or the mapped error."""
        timeout = min(time_limit, self.total_timeout)
        if payload is not None:
            body = json.dumps(payload, ensure_ascii=False).encode()
        try:
            # Short answers: bounded at about 1 MB, never decompressed, no redirects.
            reply = await self.http.fetch(self.base_url + path, method=method, headers=headers or self._headers(bearer),
                                          body=body, connect_timeout=self.connect_timeout, timeout=timeout)
        except UpstreamTimeout as exc:
            raise DifyTimeoutError(exc.phase, exc.seconds) from exc
        except UpstreamTooLarge as exc:
            raise DifyError(f"Dify {path.split('?')[0]} answered more than {exc.limit} bytes") from exc
        except UpstreamError as exc:
            raise DifyConnectionError(f"cannot reach Dify at {self._where()}: {exc}") from exc
        if not 200 <= reply.status < 300:
            raise _http_error(reply.status, reply.body)
        return reply.body

    def _headers(self, bearer: str | None = None) -> dict[str, str]:
        token = self._api_key if bearer is None else bearer
        return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def _where(self) -> str:
        """Host and port of Dify, for messages (never user info from the URL)."""
        parts = urlsplit(self.base_url)
        return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)

    def _transport_error(self, exchange: Exchange, exc: UpstreamError) -> DifyError:
        """Map a stream that failed below HTTP, by how far the exchange had got."""
        if isinstance(exc, UpstreamTimeout):
            return DifyTimeoutError(exc.phase, exc.seconds)
        if exchange.status and not 200 <= exchange.status < 300:
            return _http_error(exchange.status, b"")  # an error answer cut short: the status says enough
        if exchange.status:
            return DifyStreamError(f"Dify stream broke off: {_describe(exc)}")
        return DifyConnectionError(f"cannot reach Dify at {self._where()}: {_describe(exc)}")

    async def _error_from_body(self, exchange: Exchange, first: bytes) -> DifyHTTPError:
        """Read (a bounded part of) an error answer's body and make the error from it."""
        body = bytearray(first[:_ERROR_BODY_BYTES])
        chunk = first
        while chunk and len(body) < _ERROR_BODY_BYTES:
            try:
                chunk = await exchange.receive()
            except UpstreamError:
                break  # the status says enough; a body cut short only shortens the message
            body += chunk[: _ERROR_BODY_BYTES - len(body)]
        return _http_error(exchange.status, bytes(body))


class _WorkflowAnswer:
    """Turns a workflow run's events into the shapes every other app type streams.

    ``text_chunk`` -> MessageDelta, ``text_replace`` -> MessageReplace, ``workflow_finished`` ->
    (the outputs as one MessageDelta if no text was streamed) + a MessageFile per generated image +
    MessageEnd whose message_id is the workflow run id; a failed run raises DifyStreamError.
    """

    def __init__(self) -> None:
        self.streamed = False

    def translate(self, event: DifyEvent) -> list[DifyEvent]:
        """The events to pass on for one workflow event (other events pass unchanged)."""
        ids: dict[str, Any] = {"event": event.event, "conversation_id": "", "task_id": event.task_id,
                               "data": event.data}
        if isinstance(event, TextChunk):
            self.streamed = self.streamed or bool(event.text)
            return [MessageDelta(**ids, message_id=event.workflow_run_id, answer=event.text)]
        if isinstance(event, TextReplace):
            self.streamed = True
            return [MessageReplace(**ids, message_id=event.workflow_run_id, answer=event.text)]
        if not isinstance(event, WorkflowFinished):
            return [event]
        if event.status not in _WORKFLOW_ENDED:
            raise DifyStreamError(event.error or f"Dify workflow ended with status {event.status or 'unknown'}",
                                  code="workflow_failed")
        run = event.workflow_run_id
        out: list[DifyEvent] = []
        if not self.streamed:
            text = outputs_text(event.outputs)
            if text:
                out.append(MessageDelta(**ids, message_id=run, answer=text))
        for file in event.files:
            url = file.get("url") or file.get("remote_url")
            if isinstance(url, str) and url:
                out.append(MessageFile(**ids, message_id=run, file_type=str(file.get("type") or ""), url=url))
        inner = event.data.get("data")
        inner = inner if isinstance(inner, Mapping) else {}
        metadata: dict[str, Any] = {"status": event.status, "outputs": dict(event.outputs)}
        if isinstance(inner.get("total_tokens"), int):
            metadata["usage"] = {"total_tokens": inner["total_tokens"]}
        if "elapsed_time" in inner:
            metadata["elapsed_time"] = inner["elapsed_time"]
        out.append(MessageEnd(**ids, message_id=run, metadata=metadata))
        return out


def error_label(exc: DifyError) -> str:
    """The metric label of a Dify failure: a known code, the error's class when it has no code, or "other"."""
    code = getattr(exc, "code", "") or ""
    if not code:
        return type(exc).__name__
    return code if isinstance(code, str) and code in KNOWN_ERROR_CODES else "other"


def _stream_route(mode: str) -> tuple[str, str]:
    """The streaming endpoint of an app mode and the name of its terminal event."""
    if mode in CHAT_MODES:
        return "/chat-messages", "message_end"
    if mode == COMPLETION:
        return "/completion-messages", "message_end"
    if mode == WORKFLOW:
        return "/workflows/run", "workflow_finished"
    raise DifyError(f"unsupported Dify app mode {mode!r}")


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        answer = parse_json(body)
    except ValueError as exc:
        raise DifyError(f"Dify {what} answered something that is not JSON") from exc
    if not isinstance(answer, dict):
        raise DifyError(f"Dify {what} answered something that is not a JSON object")
    return answer


def _multipart(
    boundary: str, fields: Mapping[str, str], file_field: str, filename: str, mime_type: str, data: bytes
) -> bytes:
    """A multipart/form-data body (RFC 7578) with text fields and one file."""
    # Quotes and line breaks would end the header early; UTF-8 names are what browsers send and
    # what Dify's werkzeug decodes.
    safe_name = re.sub(r'["\\\r\n]', "_", filename) or "file"
    content_type = mime_type if _MIME.fullmatch(mime_type) else "application/octet-stream"
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    parts.append(
        (f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{safe_name}"\r\n'
         f"Content-Type: {content_type}\r\n\r\n").encode()
    )
    parts.append(data)
    parts.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(parts)


def _http_error(status: int, body: bytes) -> DifyHTTPError:
    """DifyHTTPError from an error answer: Dify's JSON fields, or a short excerpt of whatever came."""
    text = body.decode("utf-8", "replace")
    try:
        answer = parse_json(text)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and ("code" in answer or "message" in answer):
        code = str(answer.get("code") or "") or _status_code_name(status)
        message = str(answer.get("message") or "")
        return DifyHTTPError(status, code, _shorten(message) or _reason(status))
    # Not Dify's JSON (a proxy's HTML 502, a plain-text 429): keep a readable excerpt.
    excerpt = _shorten(_TAG.sub(" ", text))
    return DifyHTTPError(status, _status_code_name(status), excerpt or _reason(status))


def _status_code_name(status: int) -> str:
    """A code derived from the status ("too_many_requests", "bad_gateway"); "" if unknown."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return ""


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _shorten(text: str) -> str:
    text = _SPACE.sub(" ", text).strip()
    if len(text) <= _MESSAGE_CHARS:
        return text
    return text[: _MESSAGE_CHARS - 1] + "…"


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# ------------------------------------------------------------------------- workflow outputs

def outputs_text(outputs: Mapping[str, Any]) -> str:
    """A workflow's answer from its outputs: the first non-empty string, else compact JSON of the rest."""
    for value in outputs.values():
        if isinstance(value, str) and value:
            return value
    try:
        data = {name: value for name, value in outputs.items() if not _is_file(value)}
        if not data or all(value in (None, "", [], {}) for value in data.values()):
            return ""
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    except RecursionError:  # outputs nested about as deep as Dify's JSON could be parsed: no answer in them
        return ""


def _is_file(value: Any) -> bool:
    """Dify serialises workflow file outputs as objects tagged ``dify_model_identity``."""
    if isinstance(value, list):
        return bool(value) and all(_is_file(item) for item in value)
    return isinstance(value, dict) and value.get("dify_model_identity") == "__dify__file__"
