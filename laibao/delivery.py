"""Active replies through a message's response_url: single use, valid one hour, plain JSON."""

from __future__ import annotations

import asyncio
import json
import logging

from laibao.errors import UpstreamError, UpstreamRefused, UpstreamTooLarge
from laibao.outbound import Outbound, parse_json
from laibao.wecom import cap_utf8

log = logging.getLogger("laibao.delivery")


async def post_markdown(
    http: Outbound, url: str, content: str, retries: int = 3, timeout: float = 10.0  # noqa: ASYNC109
) -> bool:
    """Deliver ``content`` as one markdown message; retry transient failures; True once WeCom accepted it.

    The URL must be on WeCom's API host (``http.response_url``), and a redirect is a refusal: the
    answer is never posted anywhere else. A response_url can be used once, so only failures that
    cannot have been accepted (connection errors, 5xx, 429) are retried; any answer with an
    ``errcode`` is final.
    """
    body = json.dumps({"msgtype": "markdown", "markdown": {"content": cap_utf8(content)}}, ensure_ascii=False)
    pause = 0.5
    for attempt in range(1, retries + 1):
        try:
            reply = await http.fetch(url, method="POST", body=body.encode("utf-8"), allow=http.response_url,
                                     headers={"Content-Type": "application/json"},
                                     connect_timeout=timeout, timeout=timeout)
        except (UpstreamRefused, UpstreamTooLarge) as exc:
            log.error("response_url not used: %s", exc)
            return False
        except UpstreamError as exc:
            log.warning("response_url attempt %d failed: %s", attempt, exc)
        else:
            if reply.status != 429 and not 200 <= reply.status < 300 and reply.status < 500:
                log.error("response_url refused the answer: HTTP %s", reply.status)
                return False
            if 200 <= reply.status < 300:
                return _accepted(reply.body)
            log.warning("response_url attempt %d failed: HTTP %s", attempt, reply.status)
        if attempt < retries:
            await asyncio.sleep(pause)
            pause *= 2
    return False


def _accepted(body: bytes) -> bool:
    """True if WeCom's answer says ``errcode`` 0; anything else is logged as WeCom's refusal."""
    try:
        answer = parse_json(body or b"{}")
    except ValueError:
        answer = None
    errcode = answer.get("errcode") if isinstance(answer, dict) else None
    if errcode == 0 and not isinstance(errcode, bool):
        return True
    log.error("response_url answered errcode %s", errcode if isinstance(errcode, int) else "(none)")
    return False
