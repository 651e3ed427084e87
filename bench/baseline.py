"""The floor laibao's poll is measured against: a bare Tornado handler doing the same crypto and one Redis read.

Run by bench/poll.py as its own process: python bench/baseline.py PORT REDIS_URL TOKEN AES_KEY
"""

from __future__ import annotations

import asyncio
import json
import sys

import redis.asyncio
import tornado.web

from laibao.crypto import WeComCrypto


class Poll(tornado.web.RequestHandler):
    def initialize(self, crypto: WeComCrypto, client: redis.asyncio.Redis) -> None:
        self.crypto = crypto
        self.client = client

    async def post(self) -> None:
        sig, ts, nonce = (self.get_query_argument(n) for n in ("msg_signature", "timestamp", "nonce"))
        payload = self.crypto.open_callback(sig, ts, nonce, self.request.body)
        sid = payload["stream"]["id"]
        content = await self.client.get(f"baseline:{sid}")
        reply = {"msgtype": "stream", "stream": {"id": sid, "finish": True, "content": content}}
        self.finish(json.dumps(self.crypto.seal_reply(reply, nonce), separators=(",", ":")))


async def main() -> None:
    port, url, token, key = sys.argv[1:5]
    client = redis.asyncio.Redis.from_url(url, decode_responses=True)
    app = tornado.web.Application([(r"/wecom/callback", Poll, {"crypto": WeComCrypto(token, key), "client": client})])
    app.listen(int(port), address="127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
