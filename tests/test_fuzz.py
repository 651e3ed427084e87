"""Property-based tests of the callback path over real HTTP and real Redis.

Whatever arrives, laibao answers with a 2xx or 4xx (never a 5xx), keeps running, and changes no
state unless the request carries a valid signature.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tornado.httpclient import HTTPResponse
from tornado.ioloop import IOLoop

from tests.harness import CRYPTO, Service, message, running_service

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
# Decrypted payloads that look like WeCom's: known keys with values of any type, or missing.
callback_like = st.fixed_dictionaries(
    {},
    optional={
        "msgtype": st.sampled_from(["text", "stream", "event", "image", "voice", "mixed", "file", "x", ""])
        | json_values,
        "msgid": st.text(max_size=20) | json_values,
        "from": st.fixed_dictionaries({}, optional={"userid": st.text(max_size=10) | json_values}) | json_values,
        "text": st.fixed_dictionaries({}, optional={"content": st.text(max_size=40) | json_values}) | json_values,
        "stream": st.fixed_dictionaries({}, optional={"id": st.text(max_size=40) | json_values}) | json_values,
        "event": st.fixed_dictionaries({}, optional={"eventtype": st.text(max_size=20) | json_values}),
        "chattype": st.sampled_from(["single", "group"]) | json_values,
        "chatid": json_values,
        "response_url": json_values,
    },
)


@pytest.fixture
def service(io_loop: IOLoop, redis_url: str) -> Iterator[Service]:
    """laibao on real Redis with a Dify stand-in."""
    with running_service(io_loop, redis_url) as svc:
        yield svc


def post(io_loop: IOLoop, svc: Service, query: str, body: bytes) -> HTTPResponse:
    """POST exactly these bytes; HTTP errors come back as responses."""
    return io_loop.run_sync(lambda: svc.wecom.http.fetch(
        f"{svc.wecom.base_url}/wecom/callback?{query}", method="POST", body=body, raise_error=False,
        request_timeout=20))


def unchanged(io_loop: IOLoop, svc: Service) -> None:
    assert io_loop.run_sync(svc.keys) == []
    assert svc.dify.requests == []


@FUZZ
@given(query=st.text(max_size=80), body=st.binary(max_size=300))
def test_random_requests(io_loop: IOLoop, service: Service, query: str, body: bytes) -> None:
    response = post(io_loop, service, query, body)
    assert 400 <= response.code < 500
    unchanged(io_loop, service)


@FUZZ
@given(signature=st.text(max_size=60), nonce=st.text(max_size=20), timestamp=st.text(max_size=12),
       payload=callback_like)
@example(signature="0", nonce="", timestamp="¹", payload={})  # a Unicode digit: once a 500
def test_forged_signatures(io_loop: IOLoop, service: Service, signature: str, nonce: str, timestamp: str,
                           payload: dict[str, Any]) -> None:
    params, body = CRYPTO.seal_callback(payload)
    forged = {"msg_signature": signature, "nonce": nonce or params["nonce"],
              "timestamp": timestamp or params["timestamp"]}
    response = post(io_loop, service, urlencode(forged), body)
    assert response.code in (400, 401)
    unchanged(io_loop, service)


@FUZZ
@given(encrypt=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()))
def test_signed_garbage_ciphertexts(io_loop: IOLoop, service: Service, encrypt: str) -> None:
    timestamp, nonce = str(int(time.time())), "fuzznonce"
    signature = CRYPTO.sign(timestamp, nonce, encrypt)  # any text WeCom could sign, laibao can too
    body = json.dumps({"encrypt": encrypt}).encode()
    response = post(io_loop, service, urlencode({"msg_signature": signature, "timestamp": timestamp, "nonce": nonce}),
                    body)
    assert response.code == 400
    unchanged(io_loop, service)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255)), min_size=1,
                      max_size=4))
def test_mutated_ciphertexts(io_loop: IOLoop, service: Service, flips: list[tuple[int, int]]) -> None:
    params, body = CRYPTO.seal_callback(message("被篡改的消息"))
    raw = bytearray(base64.b64decode(json.loads(body)["encrypt"]))
    for index, mask in flips:
        raw[index % len(raw)] ^= mask
    encrypt = base64.b64encode(bytes(raw)).decode()
    # Re-signed, as an attacker holding the token could: the AES layer must still refuse cleanly.
    params = dict(params, msg_signature=CRYPTO.sign(params["timestamp"], params["nonce"], encrypt))
    response = post(io_loop, service, urlencode(params), json.dumps({"encrypt": encrypt}).encode())
    assert response.code < 500


@FUZZ
@given(payload=callback_like)
def test_valid_envelopes_with_arbitrary_json(io_loop: IOLoop, service: Service, payload: dict[str, Any]) -> None:
    params, body = CRYPTO.seal_callback(payload)
    response = post(io_loop, service, urlencode(params), body)
    assert response.code in (200, 400)
    if response.code == 200 and response.body:
        reply = CRYPTO.open_reply(response.body, expected_nonce=params["nonce"])
        assert reply["msgtype"] in ("stream", "text")
    health = io_loop.run_sync(lambda: service.wecom.http.fetch(service.wecom.base_url + "/healthz"))
    assert health.code == 200
