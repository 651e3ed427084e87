"""Media files between WeCom and Dify: downloads with a hard size limit, file sniffing, Dify's upload
policy, and images for ``msg_item`` (the answer's own image links included).

Downloads fail with ``MediaError`` and its kinds (``laibao.errors``); their messages are for operators
and name the host, never the URL, whose query carries WeCom's or Dify's signatures. Sniffing, the
upload policy and finding image links are pure.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import io
import logging
import mimetypes
import re
import zipfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from laibao.crypto import WeComCrypto
from laibao.errors import (
    CryptoError,
    DifyError,
    MediaError,
    MediaTooLarge,
    MediaUnavailable,
    MediaUnsupported,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamTooLarge,
)
from laibao.outbound import MAX_REDIRECTS, HostAllowlist, Outbound

log = logging.getLogger("laibao.media")

IMAGE_MAX_BYTES = 10 * 1024 * 1024  # WeCom's cap on one msg_item image (raw bytes)
_AES_PAD = 32  # WeCom media are padded to 32 bytes, so the ciphertext is at most this much longer
_SNIFF_TEXT_BYTES = 64 * 1024  # how much of a file is inspected to decide whether it is text
_MB = 1024 * 1024

# A fetch of Dify files as DifyClient.fetch does it: (url, max_bytes, timeout) -> (body, content type).
Fetch = Callable[[str, int, float], Awaitable[tuple[bytes, str]]]


# ----------------------------------------------------------------------------------------- downloads


async def fetch_media(
    http: Outbound,
    url: str,
    allow: HostAllowlist,
    max_bytes: int,
    timeout: float,  # noqa: ASYNC109 - Tornado's request_timeout, which also ends the connection
    *,
    connect_timeout: float | None = None,
) -> tuple[bytes, str]:
    """GET ``url`` from a host ``allow`` lists (redirects too): (body, Content-Type), at most ``max_bytes``."""
    host = urlsplit(url).hostname or "?"
    try:
        reply = await http.fetch(url, allow=allow, max_bytes=max_bytes, redirects=MAX_REDIRECTS,
                                 connect_timeout=connect_timeout or timeout, timeout=timeout)
    except UpstreamTooLarge:
        raise MediaTooLarge(f"media from {host} is larger than {max_bytes} bytes", max_bytes) from None
    except UpstreamRefused as exc:
        log.warning("media URL refused: %s", exc)
        raise MediaUnavailable(f"media URL refused: {exc}") from exc
    except UpstreamTimeout as exc:
        raise MediaUnavailable(f"media download from {host} timed out after {timeout:g} s") from exc
    except UpstreamError as exc:
        raise MediaUnavailable(f"cannot download media from {host}: {exc}") from exc
    if not 200 <= reply.status < 300:
        raise MediaUnavailable(f"media server {host} answered HTTP {reply.status}", reply.status)
    return reply.body, reply.content_type


async def download_wecom_media(
    http: Outbound,
    url: str,
    crypto: WeComCrypto,
    max_bytes: int,
    timeout: float,  # noqa: ASYNC109 - Tornado's request_timeout
) -> bytes:
    """Download a WeCom media URL (valid 5 minutes, WeCom's media hosts only) and decrypt it; at most ``max_bytes``."""
    try:
        encrypted, _ = await fetch_media(http, url, http.wecom_media, max_bytes + _AES_PAD, timeout)
    except MediaTooLarge as exc:
        raise MediaTooLarge(f"WeCom media is larger than {max_bytes} bytes", max_bytes) from exc
    try:
        plain = crypto.decrypt_media(encrypted)
    except CryptoError as exc:
        raise MediaUnavailable(f"WeCom media could not be decrypted ({exc})") from exc
    if len(plain) > max_bytes:
        raise MediaTooLarge(f"WeCom media is larger than {max_bytes} bytes", max_bytes)
    return plain


# ------------------------------------------------------------------------------------------ sniffing


@dataclass(frozen=True)
class MediaKind:
    """What a file is: its MIME type, a file extension, and Dify's file ``type`` for it."""

    mime_type: str
    extension: str  # without the dot
    dify_type: str  # "image" | "document" | "audio" | "video" | "custom"

    def filename(self, stem: str) -> str:
        """A file name with this kind's extension."""
        return f"{stem}.{self.extension}"


def _kind(mime: str, ext: str, dify: str) -> MediaKind:
    return MediaKind(mime, ext, dify)


JPEG = _kind("image/jpeg", "jpg", "image")
PNG = _kind("image/png", "png", "image")
GIF = _kind("image/gif", "gif", "image")
WEBP = _kind("image/webp", "webp", "image")
SVG = _kind("image/svg+xml", "svg", "image")
PDF = _kind("application/pdf", "pdf", "document")
DOCX = _kind("application/vnd.openxmlformats-officedocument.wordprocessingml.document", "docx", "document")
XLSX = _kind("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "xlsx", "document")
PPTX = _kind("application/vnd.openxmlformats-officedocument.presentationml.presentation", "pptx", "document")
EPUB = _kind("application/epub+zip", "epub", "document")
ZIP = _kind("application/zip", "zip", "custom")
MP3 = _kind("audio/mpeg", "mp3", "audio")
WAV = _kind("audio/wav", "wav", "audio")
M4A = _kind("audio/mp4", "m4a", "audio")
AMR = _kind("audio/amr", "amr", "audio")
MP4 = _kind("video/mp4", "mp4", "video")
MOV = _kind("video/quicktime", "mov", "video")
WEBM = _kind("video/webm", "webm", "video")
TEXT = _kind("text/plain", "txt", "document")
BINARY = _kind("application/octet-stream", "bin", "custom")

# Dify's document extensions (api/constants DOCUMENT_EXTENSIONS) that are plain text on disk.
_TEXT_EXTENSIONS = {
    "txt": "text/plain", "md": "text/markdown", "markdown": "text/markdown", "mdx": "text/markdown",
    "csv": "text/csv", "html": "text/html", "htm": "text/html", "xml": "application/xml",
    "vtt": "text/vtt", "properties": "text/plain", "json": "application/json",
}
# The old binary Office formats share one container (OLE2); only the name tells them apart.
_OLE_EXTENSIONS = {
    "doc": "application/msword", "xls": "application/vnd.ms-excel",
    "ppt": "application/vnd.ms-powerpoint", "msg": "application/vnd.ms-outlook",
}
_DIFY_TYPES = {
    "image": {"jpg", "jpeg", "png", "gif", "webp", "svg"},
    "audio": {"mp3", "m4a", "wav", "webm", "amr", "mpga"},
    "video": {"mp4", "mov", "mpeg", "webm"},
    "document": {"txt", "md", "markdown", "mdx", "pdf", "html", "htm", "xlsx", "xls", "vtt", "properties",
                 "doc", "docx", "csv", "eml", "msg", "pptx", "ppt", "xml", "epub"},
}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def _hint_extension(filename_hint: str) -> str:
    name = filename_hint.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _by_extension(ext: str) -> MediaKind | None:
    """The kind a bare file name suggests, when the bytes did not say."""
    if not ext:
        return None
    if ext in _TEXT_EXTENSIONS:
        return MediaKind(_TEXT_EXTENSIONS[ext], ext, "document")
    if ext in _OLE_EXTENSIONS:
        return MediaKind(_OLE_EXTENSIONS[ext], ext, "document")
    mime, _ = mimetypes.guess_type(f"x.{ext}", strict=False)
    dify = next((kind for kind, exts in _DIFY_TYPES.items() if ext in exts), "custom")
    return MediaKind(mime or "application/octet-stream", ext, dify)


def _zip_kind(data: bytes, ext: str) -> MediaKind:
    """Office Open XML and EPUB are zip files: their member names tell which one."""
    if data[30:58] == b"mimetypeapplication/epub+zip":
        return EPUB
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        names = []
    for prefix, kind in (("word/", DOCX), ("xl/", XLSX), ("ppt/", PPTX)):
        if any(name.startswith(prefix) for name in names):
            return kind
    return {"docx": DOCX, "xlsx": XLSX, "pptx": PPTX, "epub": EPUB}.get(ext, ZIP)


def _mpeg_audio(data: bytes) -> bool:
    """An MPEG audio frame header (11 sync bits, a valid layer): MP3 without an ID3 tag."""
    return len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0 and (data[1] >> 1) & 0x03 != 0


def _text_kind(data: bytes, ext: str) -> MediaKind | None:
    head = data[:_SNIFF_TEXT_BYTES]
    try:
        # The sample may end inside a character: an incomplete last sequence is no reason to say "binary".
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=len(head) == len(data))
    except UnicodeDecodeError:
        text = ""
        if ext in _TEXT_EXTENSIONS:  # Chinese Windows text files are often GBK
            try:
                text = head.decode("gb18030")
            except UnicodeDecodeError:
                return None
        else:
            return None
    if _CONTROL.search(text):
        return None
    stripped = text.lstrip()
    if stripped.startswith("<svg") or (stripped.startswith("<?xml") and "<svg" in stripped[:1024]):
        return SVG
    return MediaKind(_TEXT_EXTENSIONS[ext], ext, "document") if ext in _TEXT_EXTENSIONS else TEXT


def sniff(data: bytes, filename_hint: str = "") -> MediaKind:
    """What ``data`` is, from its magic bytes; the hint's extension decides only what bytes cannot."""
    ext = _hint_extension(filename_hint)
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if data.startswith((b"GIF87a", b"GIF89a")):
        return GIF
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WEBP
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return WAV
    if data.startswith(b"%PDF-"):
        return PDF
    if data.startswith(b"PK\x03\x04"):
        return _zip_kind(data, ext)
    if data.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return MediaKind(_OLE_EXTENSIONS[ext], ext, "document") if ext in _OLE_EXTENSIONS else BINARY
    if data.startswith(b"#!AMR"):
        return AMR
    if data.startswith(b"ID3") or _mpeg_audio(data):
        return MP3
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand.startswith(b"M4A"):
            return M4A
        if brand == b"qt  ":
            return MOV
        return MP4
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        return WEBM
    if data:
        text = _text_kind(data, ext)
        if text is not None:
            return text
    return _by_extension(ext) or BINARY


def check_upload(kind: MediaKind, size: int, parameters: Mapping[str, Any]) -> str:
    """The Dify file ``type`` to send for this file, per the app's ``GET /parameters``; raise if refused."""
    upload = parameters.get("file_upload")
    upload = upload if isinstance(upload, Mapping) else {}
    if "enabled" in upload or "allowed_file_types" in upload:
        if not upload.get("enabled"):
            raise MediaUnsupported("the Dify app does not accept files")
        allowed = {str(t).lower() for t in upload.get("allowed_file_types") or ()}
        extensions = {str(e).lower().lstrip(".") for e in upload.get("allowed_file_extensions") or ()}
        if kind.dify_type in allowed:
            dify_type = kind.dify_type
        elif "custom" in allowed and kind.extension in extensions:
            dify_type = "custom"
        else:
            raise MediaUnsupported(f"the Dify app does not accept {kind.extension} files ({kind.dify_type})")
    else:
        # Dify before 0.10 only knew images, configured under file_upload.image
        image = upload.get("image")
        if not (isinstance(image, Mapping) and image.get("enabled") and kind.dify_type == "image"):
            raise MediaUnsupported(f"the Dify app does not accept {kind.extension} files ({kind.dify_type})")
        dify_type = "image"
    system = parameters.get("system_parameters")
    system = system if isinstance(system, Mapping) else {}
    limit_name = {"image": "image_file_size_limit", "audio": "audio_file_size_limit",
                  "video": "video_file_size_limit"}.get(kind.dify_type, "file_size_limit")
    limit_mb = system.get(limit_name)
    if isinstance(limit_mb, int | float) and not isinstance(limit_mb, bool) and limit_mb > 0:
        limit = int(limit_mb * _MB)
        if size > limit:
            raise MediaTooLarge(f"{kind.extension} file of {size} bytes exceeds the Dify app's {limit_mb} MB", limit)
    return dify_type


def file_ref(dify_type: str, upload: Mapping[str, Any]) -> dict[str, str]:
    """The ``files`` entry of a chat request for an uploaded file (``upload`` is /files/upload's answer)."""
    return {"type": dify_type, "transfer_method": "local_file", "upload_file_id": str(upload["id"])}


# ---------------------------------------------------------------------------------------- images out

_FENCED = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*\n.*?(?:^[ \t]*\1[ \t]*$|\Z)", re.M | re.S)
_INLINE_CODE = re.compile(r"(`+)[^`]*?\1")
_IMAGE = re.compile(r"!\[[^\]\n]*\]\(\s*<?([^()\s<>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")


def image_links(markdown: str) -> list[str]:
    """The http(s) and root-relative URLs of markdown images ``![alt](url)``, in order, each once."""
    prose = _INLINE_CODE.sub("", _FENCED.sub("", markdown))  # an image inside code is text, not an image
    links: list[str] = []
    for match in _IMAGE.finditer(prose):
        url = match.group(1)
        relative = url.startswith("/") and not url.startswith("//")
        wanted = relative or urlsplit(url).scheme in ("http", "https")
        if wanted and url not in links:
            links.append(url)
    return links


async def image_item(
    fetch: Fetch,
    url: str,
    *,
    max_bytes: int = IMAGE_MAX_BYTES,
    timeout: float = 15.0,  # noqa: ASYNC109 - handed to the fetch, which bounds the request
) -> dict[str, Any] | None:
    """WeCom's ``msg_item`` image for ``url`` (JPG/PNG up to ``max_bytes``), or None if it cannot be one."""
    try:
        data, _ = await fetch(url, max_bytes, timeout)
    except (MediaError, DifyError) as exc:
        log.warning("image left out of the answer: %s", exc)
        return None
    kind = sniff(data)
    if kind not in (JPEG, PNG):
        log.info("image left out of the answer: WeCom shows only JPG and PNG, this is %s", kind.mime_type)
        return None
    # md5 is what WeCom asks for to check the transfer; it protects nothing here.
    digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return {"msgtype": "image", "image": {"base64": base64.b64encode(data).decode("ascii"), "md5": digest}}
