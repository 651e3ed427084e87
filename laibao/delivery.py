"""Active replies through a message's response_url: single use, valid one hour, plain JSON."""

from __future__ import annotations

import asyncio
import json
import logging

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from laibao.wecom import cap_utf8

log = logging.getLogger("laibao.delivery")


async def post_markdown(
    http: AsyncHTTPClient, url: str, content: str, retries: int = 3, timeout: float = 10.0  # noqa: ASYNC109
) -> bool:
    """Deliver ``content`` as one markdown message; retry transient failures; True once WeCom accepted it.

    A response_url can be used once, so only failures that cannot have been accepted (connection
    errors, 5xx, 429) are retried; any answer with an ``errcode`` is final.
    """
    body = json.dumps({"msgtype": "markdown", "markdown": {"content": cap_utf8(content)}}, ensure_ascii=False)
    pause = 0.5
    for attempt in range(1, retries + 1):
        try:
            response = await http.fetch(url, method="POST", body=body.encode("utf-8"),
                                        headers={"Content-Type": "application/json"},
                                        connect_timeout=timeout, request_timeout=timeout)
        except HTTPClientError as exc:
            if exc.code != 429 and exc.code < 500:
                log.error("response_url refused the answer: HTTP %s", exc.code)
                return False
            log.warning("response_url attempt %d failed: HTTP %s", attempt, exc.code)
        except OSError as exc:
            log.warning("response_url attempt %d failed: %s", attempt, type(exc).__name__)
        else:
            try:
                errcode = json.loads(response.body or b"{}").get("errcode", -1)
            except (ValueError, AttributeError):
                errcode = -1
            if errcode == 0:
                return True
            log.error("response_url answered errcode %s", errcode)
            return False
        if attempt < retries:
            await asyncio.sleep(pause)
            pause *= 2
    return False
