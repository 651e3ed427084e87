"""Media helpers: sniffing, WeCom media downloads through a real server, images for msg_item, the
20480-byte cut and the display of reasoning on every partial snapshot."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import random
import zipfile
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from laibao.answer.render import split_for_wecom, think_blocks
from laibao.crypto import WeComCrypto
from laibao.dify import DifyClient, outputs_text
from laibao.errors import (
    MediaTooLarge,
    MediaUnavailable,
    MediaUnsupported,
)
from laibao.media import (
    BINARY,
    DOCX,
    EPUB,
    GIF,
    JPEG,
    M4A,
    MOV,
    MP3,
    MP4,
    PDF,
    PNG,
    PPTX,
    SVG,
    TEXT,
    WAV,
    WEBM,
    WEBP,
    XLSX,
    ZIP,
    MediaKind,
    check_upload,
    download_wecom_media,
    image_item,
    image_links,
    sniff,
)
from laibao.outbound import Outbound
from tests.difystub import DETAILS_OPEN, DifyStub, default_parameters

KEY = "app-test-key"
# Fixed key material: AES-CBC with WeCom's fixed IV is deterministic, so every run sees the same bytes.
AES_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
CRYPTO = WeComCrypto("token", AES_KEY)
OTHER_CRYPTO = WeComCrypto("token", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG")

JPEG_BYTES = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(200))
PNG_BYTES = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(200))


# ------------------------------------------------------------------------------------------ sniff

def zipped(*names: str, first: tuple[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        if first is not None:
            archive.writestr(zipfile.ZipInfo(first[0]), first[1])  # stored, as EPUB requires
        for name in names:
            archive.writestr(name, "<xml/>")
    return buffer.getvalue()


OLE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 504
LONG_TEXT = ("第一行中文。\n" * 6000).encode()  # more than the sniffed sample, cut inside a character


@pytest.mark.parametrize(
    ("data", "hint", "expected"),
    [
        (JPEG_BYTES, "", JPEG),
        (JPEG_BYTES, "photo.png", JPEG),  # bytes win over a wrong name
        (PNG_BYTES, "", PNG),
        (b"GIF89a\x01\x00\x01\x00", "", GIF),
        (b"GIF87a\x01\x00\x01\x00", "", GIF),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "", WEBP),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "", WAV),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "", PDF),
        (zipped("[Content_Types].xml", "_rels/.rels", "word/document.xml"), "", DOCX),
        (zipped("[Content_Types].xml", "xl/workbook.xml"), "file", XLSX),
        (zipped("[Content_Types].xml", "ppt/presentation.xml"), "", PPTX),
        (zipped("META-INF/container.xml", first=("mimetype", b"application/epub+zip")), "", EPUB),
        (zipped("a.txt"), "", ZIP),
        (zipped("a.txt"), "报告.DOCX", DOCX),  # a damaged Office file: the name decides
        (OLE, "旧文档.doc", MediaKind("application/msword", "doc", "document")),
        (OLE, "表格.xls", MediaKind("application/vnd.ms-excel", "xls", "document")),
        (OLE, "", BINARY),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00", "", MP3),
        (b"\xff\xfb\x90\x64\x00\x00", "", MP3),
        (b"#!AMR\n\x3c", "", MediaKind("audio/amr", "amr", "audio")),
        (b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00", "", M4A),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00", "", MP4),
        (b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00", "", MOV),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81", "", WEBM),
        ("你好，这是一个纯文本文件。\nsecond line\n".encode(), "", TEXT),
        ("\ufeff带 BOM 的文本".encode(), "", TEXT),
        ("# 标题\n\n正文".encode(), "notes.md", MediaKind("text/markdown", "md", "document")),
        (b"a,b\n1,2\n", "data.CSV", MediaKind("text/csv", "csv", "document")),
        ("中文，GBK 编码".encode("gbk"), "旧系统导出.txt", TEXT),
        ("中文，GBK 编码".encode("gbk"), "", BINARY),
        (LONG_TEXT, "", TEXT),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "", SVG),
        (b"\x00\x01\x02binary\x00", "", BINARY),
        (b"\x00\x01\x02binary\x00", "clip.mp3", MP3),  # undecidable bytes: the name decides
        (b"\x7fELF\x02\x01\x01", "", BINARY),
        (b"", "", BINARY),
    ],
)
def test_sniff(data: bytes, hint: str, expected: MediaKind) -> None:
    assert sniff(data, hint) == expected


def test_kind_filename() -> None:
    assert sniff(PNG_BYTES).filename("wecom-image") == "wecom-image.png"


# --------------------------------------------------------------------------------- check_upload

def test_check_upload_follows_the_apps_parameters() -> None:
    params = default_parameters()
    assert check_upload(PNG, 1000, params) == "image"
    assert check_upload(PDF, 15 * 1024 * 1024, params) == "document"
    with pytest.raises(MediaTooLarge) as info:
        check_upload(PDF, 15 * 1024 * 1024 + 1, params)
    assert info.value.limit == 15 * 1024 * 1024
    with pytest.raises(MediaTooLarge):
        check_upload(JPEG, 10 * 1024 * 1024 + 1, params)  # images have their own, smaller limit
    with pytest.raises(MediaUnsupported, match="zip"):
        check_upload(ZIP, 10, params)
    params["file_upload"]["allowed_file_types"] = ["image", "custom"]
    params["file_upload"]["allowed_file_extensions"] = [".ZIP"]
    assert check_upload(ZIP, 10, params) == "custom"
    with pytest.raises(MediaUnsupported):
        check_upload(PDF, 10, params)
    params["file_upload"]["enabled"] = False
    with pytest.raises(MediaUnsupported, match="does not accept files"):
        check_upload(PNG, 10, params)


def test_check_upload_with_an_old_dify_and_no_settings() -> None:
    old = {"file_upload": {"image": {"enabled": True, "number_limits": 3}}, "system_parameters": {}}
    assert check_upload(PNG, 50 * 1024 * 1024, old) == "image"  # no limit known: Dify itself decides
    with pytest.raises(MediaUnsupported):
        check_upload(PDF, 10, old)
    with pytest.raises(MediaUnsupported):
        check_upload(PNG, 10, {})


def test_outputs_text() -> None:
    assert outputs_text({"n": 1, "answer": "答案", "more": "x"}) == "答案"
    assert outputs_text({"n": 1, "ok": True}) == '{"n":1,"ok":true}'
    assert outputs_text({"empty": "", "none": None}) == ""
    assert outputs_text({}) == ""


# ------------------------------------------------------------------------------ WeCom downloads

MEDIA = bytes(random.Random(7).randrange(256) for _ in range(100_000))


@pytest.mark.gen_test
async def test_download_wecom_media_decrypts(stub: DifyStub, outbound: Outbound) -> None:
    encrypted = CRYPTO.encrypt_media(MEDIA)
    assert encrypted != MEDIA and len(encrypted) % 32 == 0
    url = stub.serve("wecom/media-1", encrypted) + "?sign=x"
    assert await download_wecom_media(outbound, url, CRYPTO, len(MEDIA), 5) == MEDIA
    assert await download_wecom_media(outbound, url, CRYPTO, 10 * 1024 * 1024, 5) == MEDIA


@pytest.mark.parametrize("chunked", [True, False], ids=["streamed", "content-length"])
@pytest.mark.gen_test
async def test_download_wecom_media_size_limit(stub: DifyStub, outbound: Outbound, chunked: bool) -> None:
    stub.static_chunked = chunked
    url = stub.serve("wecom/big", CRYPTO.encrypt_media(MEDIA))
    with pytest.raises(MediaTooLarge) as info:
        await download_wecom_media(outbound, url, CRYPTO, len(MEDIA) - 1, 5)
    assert info.value.limit == len(MEDIA) - 1
    with pytest.raises(MediaTooLarge):
        await download_wecom_media(outbound, url, CRYPTO, 20_000, 5)
    if chunked:
        assert stub.static_aborts >= 1  # cut off while streaming, not read to the end


@pytest.mark.gen_test
async def test_download_wecom_media_failures(stub: DifyStub, outbound: Outbound) -> None:
    with pytest.raises(MediaUnavailable) as info:
        await download_wecom_media(outbound, stub.origin + "/files/expired?auth=secret-code", CRYPTO, 1000, 5)
    assert info.value.status == 404
    assert "secret-code" not in str(info.value) and "expired" not in str(info.value)
    url = stub.serve("wecom/other-key", OTHER_CRYPTO.encrypt_media(b"encrypted for another bot" * 10))
    with pytest.raises(MediaUnavailable, match="could not be decrypted"):
        await download_wecom_media(outbound, url, CRYPTO, 1000, 5)
    url = stub.serve("wecom/plain", b"not encrypted at all")
    with pytest.raises(MediaUnavailable, match="could not be decrypted"):
        await download_wecom_media(outbound, url, CRYPTO, 1000, 5)


@contextlib.asynccontextmanager
async def stalling_server() -> AsyncIterator[str]:
    """Answers the headers of a long body, then sends nothing."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc")
        await writer.drain()
        with contextlib.suppress(Exception):
            await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/media"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.gen_test
async def test_download_wecom_media_timeout(outbound: Outbound) -> None:
    async with stalling_server() as url:
        with pytest.raises(MediaUnavailable, match=r"timed out after 0\.3 s"):
            await download_wecom_media(outbound, url, CRYPTO, 10_000, 0.3)


# ---------------------------------------------------------------------------------------- images

def item_for(data: bytes) -> dict[str, Any]:
    return {"msgtype": "image", "image": {"base64": base64.b64encode(data).decode(),
                                          "md5": hashlib.md5(data).hexdigest()}}


@pytest.mark.gen_test
async def test_image_item_through_dify_and_plain_http(stub: DifyStub, outbound: Outbound) -> None:
    dify = DifyClient(stub.base_url, KEY, http=outbound)
    stub.serve("tools/a.png", PNG_BYTES, "image/png")
    stub.serve("tools/b.jpg", JPEG_BYTES, "application/octet-stream")  # the bytes decide, not the header
    stub.serve("tools/c.gif", b"GIF89a\x01\x00\x01\x00", "image/gif")
    stub.serve("tools/big.png", PNG_BYTES + b"\0" * 5000, "image/png")
    assert await image_item(dify.fetch, "/files/tools/a.png?sign=1") == item_for(PNG_BYTES)
    assert await image_item(dify.fetch, stub.origin + "/files/tools/b.jpg") == item_for(JPEG_BYTES)
    assert await image_item(dify.fetch, "/files/tools/c.gif") is None  # WeCom takes only JPG and PNG
    assert await image_item(dify.fetch, "/files/tools/big.png", max_bytes=4096) is None
    assert await image_item(dify.fetch, "/files/tools/gone.png") is None


@pytest.mark.parametrize(
    ("markdown", "links"),
    [
        ("![图表](/files/tools/a.png?timestamp=1&sign=x) 和 ![b](https://cdn.example.com/b.jpg)",
         ["/files/tools/a.png?timestamp=1&sign=x", "https://cdn.example.com/b.jpg"]),
        ('![a](<https://x.example/a.png> "标题") ![a](https://x.example/a.png)', ["https://x.example/a.png"]),
        ("[not an image](https://x.example/a.png) ![data](data:image/png;base64,AAAA) ![js](javascript:x)", []),
        ("![proto-relative](//evil.example/a.png) ![rel](images/a.png)", []),
        ("```\n![in code](https://x.example/code.png)\n```\n`![inline](https://x.example/i.png)` "
         "![real](http://x.example/r.png)", ["http://x.example/r.png"]),
        ("no images here", []),
    ],
    ids=["two", "dedupe-title", "not-fetchable", "relative-kinds", "code", "none"],
)
def test_image_links(markdown: str, links: list[str]) -> None:
    assert image_links(markdown) == links


# ----------------------------------------------------------------------------- split_for_wecom

def check_split(text: str, limit: int) -> tuple[str, str]:
    head, rest = split_for_wecom(text, limit)
    assert head + rest == text
    assert len(head.encode()) <= limit
    if len(text.encode()) <= limit:
        assert rest == ""
    else:
        assert head and rest
    return head, rest


def test_short_text_is_not_cut() -> None:
    assert split_for_wecom("你好") == ("你好", "")
    text = "汉" * (20480 // 3) + "ab"
    assert len(text.encode()) == 20480
    assert split_for_wecom(text) == (text, "")
    with pytest.raises(ValueError, match="limit"):
        split_for_wecom("abc", 3)


@pytest.mark.parametrize("char", ["é", "汉", "😀"], ids=["2-byte", "3-byte", "4-byte"])
def test_multibyte_characters_at_every_offset_near_the_limit(char: str) -> None:
    limit = 2000
    for shift in range(8):
        for total in range(limit - 8, limit + 9):
            prefix = "a" * shift
            count = (total - shift) // len(char.encode())
            text = prefix + char * count + "z" * ((total - shift) % len(char.encode())) + char * 10
            head, _ = check_split(text, limit)
            # No line breaks to prefer: the head is as long as the limit allows.
            assert len(head.encode()) > limit - len(char.encode())


def test_emoji_sequences_and_combining_marks_stay_whole() -> None:
    family = "👨\u200d👩\u200d👧"
    for pad in range(12):
        text = "a" * (100 - pad) + family * 5
        head, rest = check_split(text, 100)
        assert not head.endswith("\u200d") and not rest.startswith("\u200d")
    accented = "e\u0301"  # e + combining acute accent
    for pad in range(4):
        head, rest = check_split("a" * (50 - pad) + accented * 30, 50)
        assert not rest.startswith("\u0301")


def test_prefers_a_line_break() -> None:
    paragraph = "这是一段话。" * 30 + "\n"
    text = paragraph * 20
    head, rest = check_split(text, 4000)
    assert head.endswith("\n") and rest.startswith("这")
    assert len(head.encode()) > 4000 - len(paragraph.encode())


def test_does_not_cut_inside_a_code_fence() -> None:
    prose = "说明文字。\n" * 200  # ~3.2 KB
    code = "```python\n" + "".join(f"print({i})  # 一行代码\n" for i in range(400)) + "```\n"
    text = prose + code + "结尾。\n"
    head, rest = check_split(text, 5000)  # the limit falls inside the code block
    assert head == prose
    assert rest.startswith("```python\n")
    tilde = prose + code.replace("```", "~~~~") + "结尾。"
    assert check_split(tilde, 5000)[0] == prose


def test_a_code_block_too_big_to_move_is_cut_at_a_line() -> None:
    code = "```\n" + "".join(f"line {i} 代码\n" for i in range(2000)) + "```\n"
    text = "开头\n" + code
    head, _ = check_split(text, 4000)
    assert head.startswith("开头\n```\n")  # moving the fence would leave a trivial head
    assert head.endswith("\n") and len(head.encode()) > 3900


def test_a_closed_fence_before_the_cut_is_no_obstacle() -> None:
    text = "前言\n```js\nlet a = 1\n```\n" + "正文。" * 2000
    head, _ = check_split(text, 3000)
    assert len(head.encode()) > 2990  # one long paragraph: cut at the limit, not before the old fence


def test_inline_backticks_and_unclosed_info_strings_are_not_fences() -> None:
    text = "用 ```inline``` 标记\n" + "正文。" * 2000
    head, _ = check_split(text, 3000)
    assert len(head.encode()) > 2990


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "汉", "😀", "é", "\n", "```\n", "```py\n", " ", "\u200d", "e\u0301"]),
                max_size=400),
       st.integers(min_value=4, max_value=600))
def test_split_invariants(pieces: list[str], limit: int) -> None:
    check_split("".join(pieces), limit)


# ---------------------------------------------------------------------------------- think_blocks

THINK_SAMPLE = "<think>\n用户问天气，REASONING 先查城市。\n</think>\n\n北京今天晴，25°C。a < b 且 c > d。"
DETAILS_SAMPLE = (DETAILS_OPEN + "\nREASONING 在 Dify 的折叠块里。\n</details>\n\n答案：**42**。<br/>完毕。")
TWO_BLOCKS = ("<think>REASONING 一</think>第一段。\n" + DETAILS_OPEN + "REASONING 二</details>第二段。"
              "<details><summary>更多信息</summary>正文细节</details>")
SAMPLES = [THINK_SAMPLE, DETAILS_SAMPLE, TWO_BLOCKS, "没有推理的普通回答，含 <b>标签</b> 和 x<y。"]


def test_show_and_hide_complete_answers() -> None:
    assert think_blocks(THINK_SAMPLE, "show") == THINK_SAMPLE
    assert think_blocks(THINK_SAMPLE, "hide") == "北京今天晴，25°C。a < b 且 c > d。"
    assert think_blocks(DETAILS_SAMPLE, "show") == (
        "<think>\nREASONING 在 Dify 的折叠块里。\n</think>\n\n答案：**42**。<br/>完毕。")
    assert think_blocks(DETAILS_SAMPLE, "hide") == "答案：**42**。<br/>完毕。"
    details = "<details><summary>更多信息</summary>正文细节</details>"  # not reasoning: content, kept
    assert think_blocks(TWO_BLOCKS, "show") == (
        "<think>REASONING 一</think>第一段。\n<think>REASONING 二</think>第二段。" + details)
    assert think_blocks(TWO_BLOCKS, "hide") == "第一段。\n第二段。" + details
    with pytest.raises(ValueError, match="show"):
        think_blocks("x", "fold")


def balanced_think(text: str) -> bool:
    """Every </think> closes an open <think>, none nests; at most the last one is left open."""
    depth = 0
    for index in range(len(text)):
        if text.startswith("<think>", index):
            if depth:
                return False
            depth = 1
        elif text.startswith("</think>", index):
            if not depth:
                return False
            depth = 0
    return True


@pytest.mark.parametrize("sample", SAMPLES, ids=["think", "details", "two-blocks", "plain"])
@pytest.mark.parametrize("mode", ["show", "hide"])
def test_every_partial_snapshot(sample: str, mode: str) -> None:
    full = think_blocks(sample, mode)
    assert think_blocks(sample, mode, final=True) == full
    for end in range(len(sample) + 1):
        shown = think_blocks(sample[:end], mode)
        # What WeCom shows only ever grows: each snapshot is the start of the final one.
        assert full.startswith(shown), (end, shown)
        assert "<details style" not in shown and "Thinking..." not in shown
        assert balanced_think(shown), (end, shown)
        if mode == "hide":
            assert "<think" not in shown and "</think" not in shown and "REASONING" not in shown, (end, shown)
        elif "REASONING" in shown:
            assert "<think>" in shown


def test_an_open_block_while_streaming() -> None:
    partial = "<think>还在想REASONING"
    assert think_blocks(partial, "show") == partial
    assert think_blocks(partial, "hide") == ""
    assert think_blocks(partial + "</thi", "show") == partial  # the closing tag is on its way
    assert think_blocks(DETAILS_OPEN + "想到一半", "show") == "<think>想到一半"
    assert think_blocks(DETAILS_OPEN[:40], "show") == ""  # a tag still arriving is held back


def test_final_text_holds_nothing_back() -> None:
    assert think_blocks("比较 a<", "show") == "比较 a"
    assert think_blocks("比较 a<", "show", final=True) == "比较 a<"
    assert think_blocks("结尾 <thi", "hide", final=True) == "结尾 <thi"
    assert think_blocks("<think>没有结束", "show", final=True) == "<think>没有结束"


def test_a_close_without_an_opening_makes_the_start_reasoning() -> None:
    # Some providers stream DeepSeek-R1 without its opening <think>.
    text = "先分析问题REASONING\n</think>\n\n答案是 4。"
    assert think_blocks(text, "show") == "<think>先分析问题REASONING\n</think>\n\n答案是 4。"
    assert think_blocks(text, "hide") == "答案是 4。"


def test_hidden_reasoning_mid_answer_keeps_the_spacing() -> None:
    assert think_blocks("前文 <think>x</think> 后文", "hide") == "前文  后文"
    assert think_blocks("<THINK>大写</THINK>答案", "hide") == "答案"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    "文本", " ", "\n", "a<b", "<i>x</i>", "<think>REASONING</think>", "<think>\nREASONING\n</think>\n\n",
    DETAILS_OPEN + "REASONING</details>", "<details><summary>附录</summary>内容</details>", "x > y",
]), max_size=12), st.sampled_from(["show", "hide"]))
def test_composed_answers_never_leak_reasoning_markup(pieces: list[str], mode: str) -> None:
    text = "".join(pieces)
    full = think_blocks(text, mode)
    for end in range(0, len(text) + 1, 3):
        shown = think_blocks(text[:end], mode)
        assert full.startswith(shown)
        assert "<details style" not in shown and balanced_think(shown)
        if mode == "hide":
            assert "REASONING" not in shown and "think>" not in shown
