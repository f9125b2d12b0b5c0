"""The gateway's request path on granian (Rust, hyper) instead of codefleet's own HTTP/1.1 protocol:
a measurement prototype for benchmarks/router_overhead.py ``--alternative granian``, not a product.

It keeps what decides the cost: the key and Content-Length checked from the head before the body
is read, the body's structural check (``codefleet.gateway.policy``), and the same keep-alive pool
to the router (``codefleet.gateway.upstream``); the answer is streamed back through granian's
RSGI transport. Only the server under the policy differs.

    CODEFLEET_GATEWAY_CONFIG=gateway.json granian --interface rsgi --loop uvloop \\
        --host 127.0.0.1 --port 8001 benchmarks.gateway_granian:app
"""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from typing import Any

from codefleet.gateway.answers import Rejection
from codefleet.gateway.config import FORWARDED, UPSTREAM_KEY_ENV, GatewayConfig
from codefleet.gateway.policy import check_body, check_head
from codefleet.gateway.pool import Pool
from codefleet.gateway.upstream import HOP_BY_HOP

_DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"})
_PATHS = frozenset(FORWARDED)


class _Answer:
    """What ``codefleet.gateway.upstream.Upstream`` reports, queued for the RSGI handler."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.conn: Any = None

    def upstream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.queue.put_nowait(("head", (status, headers)))

    def upstream_body(self, body: bytes) -> None:
        self.queue.put_nowait(("body", body))

    def upstream_done(self) -> None:
        self.queue.put_nowait(("done", None))

    def upstream_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(("lost", exc))


class App:
    def __init__(self, config: GatewayConfig, upstream_key: str | None) -> None:
        self.config = config
        self.models = frozenset(config.models)
        self.digests = tuple(bytes.fromhex(h) for h in config.key_sha256)
        self.auth = f"Bearer {upstream_key}".encode() if upstream_key else None
        url = urllib.parse.urlsplit(config.router_url)
        self.addr = (url.hostname or "127.0.0.1", url.port or 80)
        self.host = url.netloc.encode()
        self.pool: Pool | None = None

    @staticmethod
    def _reply(proto: Any, r: Rejection) -> None:
        proto.response_bytes(r.status, [("content-type", "application/json"),
                                        *((k.decode(), v.decode()) for k, v in r.headers)], r.body)

    async def __call__(self, scope: Any, proto: Any) -> None:
        if self.pool is None:
            self.pool = Pool(self.addr)
        if scope.path == "/health":
            proto.response_str(200, [("content-type", "text/plain")], "ok")
            return
        h = scope.headers
        auth = h.get("authorization")
        length = h.get("content-length")
        rej = check_head(scope.method.encode(), scope.path.encode(), auth.encode() if auth else None,
                         int(length) if length and length.isdigit() else None, self.digests,
                         self.config.max_body_bytes)
        if rej is not None:
            self._reply(proto, rej)
            return
        if scope.path not in _PATHS or scope.method != "POST":
            proto.response_bytes(404, [("content-type", "application/json")], b'{"error": {"message": "not found"}}')
            return
        body = await proto()
        checked = check_body(scope.path.encode(), body)
        if isinstance(checked, Rejection):
            self._reply(proto, checked)
            return
        payload, model = checked
        if model not in self.models:
            proto.response_bytes(404, [("content-type", "application/json")], b'{"error": {"code": "model_not_found"}}')
            return
        parts = [b"POST ", scope.path.encode(), b" HTTP/1.1\r\nHost: ", self.host,
                 b"\r\nContent-Type: application/json\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
        if self.auth:
            parts += (b"Authorization: ", self.auth, b"\r\n")
        for name, value in h.items():
            if name.encode() not in HOP_BY_HOP:
                parts += (name.encode(), b": ", value.encode(), b"\r\n")
        parts += (b"\r\n", body)
        answer = _Answer()
        conn = self.pool.take() or await self.pool.connect()
        conn.send(answer, b"".join(parts))  # type: ignore[arg-type]  # the four upstream_* methods
        kind, value = await answer.queue.get()
        if kind != "head":
            proto.response_bytes(502, [("content-type", "application/json")], b'{"error": {"message": "upstream"}}')
            return
        status, headers = value
        out = [(k.decode(), v.decode()) for k, v in headers if k.lower().decode() not in _DROP]
        if payload.get("stream") is True and status < 400:
            transport = proto.response_stream(status, out)
            while True:
                kind, value = await answer.queue.get()
                if kind != "body":
                    break
                await transport.send_bytes(value)
            return
        chunks = []
        while True:
            kind, value = await answer.queue.get()
            if kind != "body":
                break
            chunks.append(value)
        proto.response_bytes(status, out, b"".join(chunks))


app = App(GatewayConfig.from_file(os.environ["CODEFLEET_GATEWAY_CONFIG"]), os.environ.get(UPSTREAM_KEY_ENV))
