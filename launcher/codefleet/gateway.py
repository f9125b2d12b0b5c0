"""The fleet's one OpenAI endpoint: a thin gate in front of vllm-router.

vllm-router (Rust, vLLM project) does the routing: per-model worker sets in IGW mode, the
load- and prefix-aware policy, retries and circuit breakers. It falls short of an OpenAI
endpoint in a few places, measured on vllm-router 0.1.17:

* ``GET /v1/models`` answers ``{"models": [...]}``, not OpenAI's list shape;
  ``GET /v1/models/{id}`` answers 405;
* a request for an unknown model is forwarded to *some* worker (a 200 from another model);
* a request without ``model`` gets 503 "No available workers" (a 5xx for a client mistake);
* errors are plain text, not OpenAI's ``{"error": {...}}``;
* clients are not authenticated (``--api-key`` is what the router sends to workers).

This gate closes exactly those gaps and nothing else: it checks the key, the body size and the
``model`` field, answers ``/v1/models`` itself, and passes everything else to the router over
pooled keep-alive connections, streaming the answer back as it comes.

It sits on every request's path, so it is written as a plain asyncio protocol on uvloop with
llhttp (``httptools``, the parser uvicorn uses) rather than on a web framework: a request costs
one JSON parse of the body, one write to the router and one write per chunk back. The first
version on aiohttp added 0.7 ms p50 per request; see ``benchmarks/router_overhead.py`` and
benchmarks/README.md for what this one adds. The metrics endpoint, off the request path, stays
on aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import signal
import time
import urllib.parse
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httptools
import orjson
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from aiohttp.client_exceptions import ClientError
from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Paths the gate forwards to the router (POST, JSON body with a ``model``).
FORWARDED = ("/v1/chat/completions", "/v1/completions")

#: Environment variable carrying the key the gate presents to the engines (never on argv).
UPSTREAM_KEY_ENV = "CODEFLEET_UPSTREAM_KEY"

disable_created_metrics()

_SSE_DONE = b"data: [DONE]\n\n"
_FORWARDED = frozenset(p.encode() for p in FORWARDED)

#: Request headers not passed to the router (hop-by-hop, or set by the gate itself).
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"host", b"content-length", b"authorization", b"content-type", b"expect",
})
#: Response headers not passed back to the client (the gate sets its own framing).
_RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server"})

_IDLE_UPSTREAM = 512
"""Keep-alive connections to the router kept open when idle."""

_MAX_CONNECTING = 64
"""New connections to the router that have not yet seen a byte from it. vllm-router 0.1.17 listens
with a backlog of 128 (``ss -ltn``); the kernel completes a handshake before the router accepts the
connection, so a burst of 1,000 new streams overflowed its accept queue (``nstat``
TcpExtListenOverflows: 100-200 per burst) and the dropped SYNs were retried a second or more later.
A new connection holds its permit until the router answers on it (so it was accepted), it closes,
or ``_PERMIT_HOLD_S`` passes (a non-streamed answer may take minutes)."""

_PERMIT_HOLD_S = 0.05


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gate needs; written by the launcher (or rendered by the Helm chart) as JSON."""

    router_url: str
    models: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    key_sha256: tuple[str, ...] = ()
    """Hex SHA-256 of each accepted client key; empty means no authentication."""
    max_body_bytes: int = 32 * 1024 * 1024
    poll_s: float = 0.5
    """How often the gate reads the router's worker list."""
    created: int = field(default_factory=lambda: int(time.time()))

    def to_json(self) -> str:
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}, indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> GatewayConfig:
        data = json.loads(Path(path).read_text())
        data["models"] = tuple(data["models"])
        data["key_sha256"] = tuple(data.get("key_sha256", ()))
        return cls(**data)


def hash_keys(keys: Iterable[str]) -> tuple[str, ...]:
    return tuple(hashlib.sha256(k.encode()).hexdigest() for k in keys)


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> bytes:
    """OpenAI's error shape."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def _head(status: int, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode() if status in _PHRASES else b"")]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


_PHRASES = frozenset(s.value for s in HTTPStatus)


class _Request:
    __slots__ = ("method", "path", "headers", "body", "keep_alive", "too_large")

    def __init__(self) -> None:
        self.method = b""
        self.path = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.keep_alive = True
        self.too_large = False

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


class Gateway:
    """The checks and answers of the gate; ``_Client`` and ``_Exchange`` move the bytes."""

    def __init__(self, config: GatewayConfig, upstream_key: str | None = None) -> None:
        self.config = config
        self.models = frozenset(config.models)
        self._key_digests = tuple(bytes.fromhex(h) for h in config.key_sha256)
        self.upstream_auth = f"Bearer {upstream_key}".encode() if upstream_key else None
        url = urllib.parse.urlsplit(config.router_url)
        self.upstream_addr = (url.hostname or "127.0.0.1", url.port or 80)
        self.upstream_host = url.netloc.encode()
        self.pool = _Pool(self.upstream_addr)
        self._session: ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None
        #: Models with at least one healthy worker in the router, refreshed every ``poll_s``.
        #: vllm-router sends a request for a model without workers to *another* model's worker,
        #: so the gate answers 503 itself for those.
        self.available: frozenset[str] = self.models
        self._refreshed_at = 0.0
        self._refreshing: asyncio.Future[None] | None = None
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "codefleet_gateway_requests", "Requests answered by the gateway, by model and HTTP status",
            ["model", "status"], registry=self.registry,
        )
        self.rejected = Counter(
            "codefleet_gateway_rejected", "Requests the gateway answered itself without reaching the router",
            ["reason"], registry=self.registry,
        )
        self._counted: dict[tuple[str, str], Any] = {}
        self._models_body = orjson.dumps({
            "object": "list",
            "data": [self._model_object(m) for m in config.models],
        })
        self._tasks: set[asyncio.Task[Any]] = set()

    def _model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.config.created, "owned_by": "codefleet"}

    def count(self, model: str, status: str) -> None:
        child = self._counted.get((model, status))
        if child is None:
            child = self._counted[(model, status)] = self.requests.labels(model, status)
        child.inc()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        self._session = ClientSession(connector=TCPConnector(limit=4), timeout=ClientTimeout(total=5))
        await self.refresh_workers()
        self._poller = asyncio.create_task(self._poll_workers())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._session is not None:
            await self._session.close()
        self.pool.close()

    async def refresh_workers(self) -> None:
        assert self._session is not None
        try:
            async with self._session.get(self.config.router_url + "/workers") as r:
                data = await r.json(content_type=None)
            self.available = frozenset(w["model_id"] for w in data.get("workers", []) if w.get("is_healthy", True))
        except (ClientError, TimeoutError, ValueError, KeyError):
            pass  # router restarting: keep the last known set
        self._refreshed_at = time.monotonic()

    async def _poll_workers(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_s)
            await self.refresh_workers()

    def metrics_app(self) -> web.Application:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app

    # -- checks --------------------------------------------------------------------------------

    def authorized(self, req: _Request) -> bool:
        if not self._key_digests:
            return True
        scheme, _, token = (req.header(b"authorization") or b"").partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False
        digest = hashlib.sha256(token).digest()
        ok = False
        for known in self._key_digests:  # no early exit: same time for every key
            ok |= hmac.compare_digest(digest, known)
        return ok

    # -- dispatch ------------------------------------------------------------------------------

    def dispatch(self, client: _Client, req: _Request) -> None:
        """Answer ``req`` or start forwarding it; ends with ``client.done()`` either way."""
        path, method = req.path, req.method
        if path == b"/health":
            client.respond(200, b"ok", content_type=b"text/plain")
            return
        if not self.authorized(req):
            self.rejected.labels("unauthorized").inc()
            client.respond(401, error_body("Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                                           code="invalid_api_key"), headers=((b"WWW-Authenticate", b"Bearer"),))
            return
        if path == b"/v1/models" or path.startswith(b"/v1/models/"):
            if method != b"GET":
                self._not_allowed(client, req, b"GET")
            elif path == b"/v1/models":
                client.respond(200, self._models_body)
            else:
                name = urllib.parse.unquote(path[len(b"/v1/models/"):].decode("latin-1"))
                if name in self.models:
                    client.respond(200, orjson.dumps(self._model_object(name)))
                else:
                    self._unknown_model(client, name)
            return
        if path in _FORWARDED:
            if method != b"POST":
                self._not_allowed(client, req, b"POST")
            else:
                self.forward(client, req)
            return
        self.rejected.labels("unknown_path").inc()
        client.respond(404, error_body(f"Unknown path {path.decode('latin-1')}. This endpoint serves "
                                       f"{', '.join(FORWARDED)} and /v1/models.", code="unknown_url"))

    def _not_allowed(self, client: _Client, req: _Request, allow: bytes) -> None:
        self.rejected.labels("unknown_path").inc()
        client.respond(405, error_body(f"Method {req.method.decode('latin-1')} is not allowed on "
                                       f"{req.path.decode('latin-1')}.", code="method_not_allowed"),
                       headers=((b"Allow", allow),))

    def _unknown_model(self, client: _Client, name: str) -> None:
        self.rejected.labels("unknown_model").inc()
        client.respond(404, error_body(
            f"The model `{name}` does not exist. Served models: {', '.join(sorted(self.models))}.",
            param="model", code="model_not_found"))

    def no_replica(self, client: _Client, model: str) -> None:
        self.count(model, "503")
        client.respond(503, error_body(f"Model `{model}` has no ready replica right now; retry shortly.",
                                       type_="server_error", code="model_unavailable"),
                       headers=((b"Retry-After", b"5"),))

    def forward(self, client: _Client, req: _Request) -> None:
        if req.too_large:
            self.rejected.labels("too_large").inc()
            client.respond(413, error_body(f"The request body is larger than {self.config.max_body_bytes} bytes.",
                                           code="request_too_large"))
            return
        try:
            payload = orjson.loads(req.body)
        except orjson.JSONDecodeError as exc:
            self.rejected.labels("invalid_json").inc()
            client.respond(400, error_body(f"The request body is not valid JSON: {exc}.", code="invalid_json"))
            return
        if not isinstance(payload, dict):
            self.rejected.labels("invalid_json").inc()
            client.respond(400, error_body(f"The request body must be a JSON object, not {type(payload).__name__}.",
                                           code="invalid_json"))
            return
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            self.rejected.labels("missing_model").inc()
            client.respond(400, error_body("The request needs a `model` (a string); GET /v1/models lists them.",
                                           param="model", code="missing_model"))
            return
        if model not in self.models:
            self._unknown_model(client, model)
            return
        exchange = _Exchange(self, client, req, model, stream=bool(payload.get("stream")))
        if model in self.available:
            exchange.start()
        else:
            self.spawn(self._recheck(exchange))

    async def _recheck(self, exchange: _Exchange) -> None:
        """A replica may have just been registered: look again before answering 503. Requests that
        arrive together share one look; one finished under 0.1 s ago counts as fresh."""
        if self._refreshing is None or self._refreshing.done():
            if time.monotonic() - self._refreshed_at > 0.1:
                self._refreshing = asyncio.ensure_future(self.refresh_workers())
        if self._refreshing is not None and not self._refreshing.done():
            await asyncio.shield(self._refreshing)
        if exchange.model in self.available:
            exchange.start()
        else:
            self.no_replica(exchange.client, exchange.model)


class _Client(asyncio.Protocol):
    """One client connection: parses requests (keep-alive, pipelined in order) and writes answers."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.req = _Request()
        self._url = b""
        self._body: list[bytes] = []
        self._size = 0
        self.queue: deque[_Request] = deque()
        self.busy = False
        self.closed = False
        self.current: _Request | None = None
        self.exchange: _Exchange | None = None
        self._dispatching = False
        self._paused = False

    # -- transport -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._bad_request("protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._bad_request(f"malformed HTTP request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.exchange is not None:
            self.exchange.client_gone()

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_upstream()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.resume_upstream()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def _bad_request(self, why: str) -> None:
        if not self.busy:
            self.respond(400, error_body(why + ".", code="bad_request"), keep_alive=False)
        elif self.transport is not None:
            self.transport.close()

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.req = _Request()
        self._url = b""
        self._body = []
        self._size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.req.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        req = self.req
        req.method = self.parser.get_method()
        req.keep_alive = self.parser.should_keep_alive()
        req.path = self._url.split(b"?", 1)[0]
        length = req.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.gw.config.max_body_bytes:
            req.too_large = True
        if (req.header(b"expect") or b"").lower() == b"100-continue" and not req.too_large:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.req.too_large:
            return  # read and dropped, so that the 413 reaches the client before the connection ends
        self._size += len(body)
        if self._size > self.gw.config.max_body_bytes:
            self.req.too_large = True
            self._body = []
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self.req.body = b"".join(self._body)
        self._body = []
        self.queue.append(self.req)
        if len(self.queue) > 16 and self.transport is not None and not self._paused:
            self.transport.pause_reading()  # a client pipelining far ahead waits
            self._paused = True
        self._next()

    # -- answering -----------------------------------------------------------------------------

    def _next(self) -> None:
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self.queue and not self.busy and not self.closed:
                self.busy = True
                self.current = self.queue.popleft()
                self.gw.dispatch(self, self.current)
        finally:
            self._dispatching = False
        if self._paused and len(self.queue) <= 4 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def respond(self, status: int, body: bytes, *, content_type: bytes = b"application/json",
                headers: Iterable[tuple[bytes, bytes]] = (), keep_alive: bool | None = None) -> None:
        keep = self.current.keep_alive if keep_alive is None and self.current is not None else bool(keep_alive)
        hdrs = [(b"Content-Type", content_type), (b"Content-Length", str(len(body)).encode()), *headers]
        if not keep:
            hdrs.append((b"Connection", b"close"))
        self.write(_head(status, hdrs) + body)
        self.done(keep)

    def done(self, keep_alive: bool) -> None:
        """The current request is answered."""
        self.exchange = None
        self.current = None
        if not keep_alive:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        self.busy = False
        self._next()


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to the router, carrying one exchange at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.used = False
        self.closed = False
        self.permit = False  # holds one of the pool's connecting permits

    def release_permit(self) -> None:
        if self.permit:
            self.permit = False
            self.pool.connecting.release()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not a subclass

    def send(self, exchange: _Exchange, data: bytes) -> None:
        assert self.transport is not None
        self.exchange = exchange
        self.headers = []
        self.used = True
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.release_permit()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_head(self.parser.get_status_code(), self.headers)

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.upstream_body(body)

    def on_message_complete(self) -> None:
        exchange, self.exchange = self.exchange, None
        if self.parser.should_keep_alive() and not self.closed:
            self.pool.release(self)
        else:
            self.abort()
        if exchange is not None:
            exchange.upstream_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.release_permit()
        self.pool.discard(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost(exc)


class _Pool:
    def __init__(self, addr: tuple[str, int]) -> None:
        self.addr = addr
        self.idle: list[_Upstream] = []
        self.connecting = asyncio.Semaphore(_MAX_CONNECTING)

    def take(self) -> _Upstream | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def connect(self) -> _Upstream:
        loop = asyncio.get_running_loop()
        await self.connecting.acquire()
        try:
            _, proto = await loop.create_connection(lambda: _Upstream(self), *self.addr)
        except BaseException:
            self.connecting.release()
            raise
        proto.permit = True
        loop.call_later(_PERMIT_HOLD_S, proto.release_permit)
        return proto

    def release(self, conn: _Upstream) -> None:
        conn.release_permit()  # returned unused (its client left): the router may never write on it
        if len(self.idle) < _IDLE_UPSTREAM:
            self.idle.append(conn)
        else:
            conn.abort()

    def discard(self, conn: _Upstream) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle.clear()


class _Exchange:
    """One request forwarded to the router and its answer streamed back."""

    def __init__(self, gw: Gateway, client: _Client, req: _Request, model: str, stream: bool) -> None:
        self.gw = gw
        self.client = client
        self.req = req
        self.model = model
        self.stream = stream
        self.conn: _Upstream | None = None
        self.retried = False
        self.fresh = True
        self.status = 0
        self.mode = ""  # "chunked" | "length" | "wrap" (plain-text error from the router, rewritten)
        self.buffer: list[bytes] = []
        self.tail = b""
        self.finished = False

    def _request_bytes(self) -> bytes:
        req, gw = self.req, self.gw
        parts = [b"POST ", req.path, b" HTTP/1.1\r\nHost: ", gw.upstream_host,
                 b"\r\nContent-Type: application/json\r\nContent-Length: ", str(len(req.body)).encode(), b"\r\n"]
        if gw.upstream_auth:
            parts += (b"Authorization: ", gw.upstream_auth, b"\r\n")
        for name, value in req.headers:
            if name not in _HOP_BY_HOP:
                parts += (name, b": ", value, b"\r\n")
        parts += (b"\r\n", req.body)
        return b"".join(parts)

    def start(self) -> None:
        if self.client.closed:
            return
        self.client.exchange = self
        conn = self.gw.pool.take()
        if conn is not None:
            self._send(conn)
        else:
            self.gw.spawn(self._connect())

    async def _connect(self) -> None:
        try:
            conn = await self.gw.pool.connect()
        except OSError as exc:
            self._fail(f"The router did not answer for model `{self.model}`: {exc.strerror or exc}.")
            return
        if self.client.closed:
            self.gw.pool.release(conn)
            return
        self._send(conn)

    def _send(self, conn: _Upstream) -> None:
        self.conn = conn
        self.fresh = not conn.used
        conn.send(self, self._request_bytes())

    # -- from the router -----------------------------------------------------------------------

    def upstream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        content_type = b""
        length = None
        out: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            low = name.lower()
            if low == b"content-type":
                content_type = value
            elif low == b"content-length":
                length = value
            if low not in _RESPONSE_DROP:
                out.append((name, value))
        if status >= 400 and b"json" not in content_type:
            self.mode = "wrap"
            return
        if length is not None:
            self.mode = "length"
            out.append((b"Content-Length", length))
        else:
            self.mode = "chunked"
            out.append((b"Transfer-Encoding", b"chunked"))
        if not self.req.keep_alive:
            out.append((b"Connection", b"close"))
        self.gw.count(self.model, str(status))
        self.client.write(_head(status, out))

    def upstream_body(self, body: bytes) -> None:
        if self.mode == "chunked":
            self.client.write(b"%x\r\n%b\r\n" % (len(body), body))
        elif self.mode == "length":
            self.client.write(body)
        else:
            self.buffer.append(body)
        if self.stream:
            self.tail = (self.tail + body)[-16:]

    def upstream_done(self) -> None:
        self.conn = None
        if self.mode == "wrap":
            self._wrap_error(b"".join(self.buffer).decode(errors="replace").strip())
            return
        if self.mode == "chunked":
            if self.stream and self.status < 400 and not self.tail.endswith(_SSE_DONE):
                self._stream_error("the replica's stream ended early")
            self.client.write(b"0\r\n\r\n")
        self._finish(self.req.keep_alive)

    def upstream_lost(self, exc: Exception | None) -> None:
        self.conn = None
        if self.finished:
            return
        if not self.status:
            if not self.fresh and not self.retried and not self.client.closed:
                # A kept-alive connection the router had just closed: once more on a new one.
                self.retried = True
                self.gw.spawn(self._connect())
                return
            self._fail(f"The router did not answer for model `{self.model}`: "
                       f"{exc or 'connection closed before a response'}.")
        elif self.mode == "chunked":
            # Mid-stream (the replica or the router died): the status line is gone, so end the
            # stream with an error event, which the OpenAI SDK raises as APIError.
            self._stream_error(f"the replica failed mid-stream ({type(exc).__name__ if exc else 'connection closed'})")
            self.client.write(b"0\r\n\r\n")
            self._finish(self.req.keep_alive)
        else:
            self._finish(False)  # a cut fixed-length body: only closing the connection says so

    # -- from the client -----------------------------------------------------------------------

    def client_gone(self) -> None:
        self.finished = True
        if self.conn is not None:
            self.conn.exchange = None
            self.conn.abort()  # the router sees the disconnect and cancels the generation
            self.conn = None

    def pause_upstream(self) -> None:
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.pause_reading()

    def resume_upstream(self) -> None:
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.resume_reading()

    # -- endings -------------------------------------------------------------------------------

    def _finish(self, keep_alive: bool) -> None:
        if not self.finished:
            self.finished = True
            self.client.done(keep_alive)

    def _fail(self, message: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.gw.count(self.model, "502")
        self.client.respond(502, error_body(message, type_="server_error", code="upstream_unavailable"))

    def _stream_error(self, why: str) -> None:
        self.gw.count(self.model, "stream_aborted")
        err = error_body(f"Generation for model `{self.model}` was interrupted: {why}; retry the request.",
                         type_="server_error", code="stream_interrupted")
        event = b"data: " + err + b"\n\n" + _SSE_DONE
        self.client.write(b"%x\r\n%b\r\n" % (len(event), event))

    def _wrap_error(self, text: str) -> None:
        """The router's plain-text errors in OpenAI's shape, keeping the status."""
        self.finished = True
        if self.status == 503 and "No available workers" in text:
            self.gw.no_replica(self.client, self.model)
            return
        self.gw.count(self.model, str(self.status))
        type_ = "invalid_request_error" if self.status < 500 else "server_error"
        self.client.respond(self.status, error_body(text or f"upstream status {self.status}", type_=type_))


async def serve(config: GatewayConfig, upstream_key: str | None = None) -> None:
    gw = Gateway(config, upstream_key)
    await gw.open()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(gw), config.host, config.port, backlog=2048,
                                      reuse_address=True)
    metrics_runner = web.AppRunner(gw.metrics_app(), access_log=None, handle_signals=False)
    await metrics_runner.setup()
    await web.TCPSite(metrics_runner, config.metrics_host, config.metrics_port).start()
    print(f"codefleet gateway on http://{config.host}:{config.port} -> {config.router_url}; "
          f"metrics on http://{config.metrics_host}:{config.metrics_port}/metrics", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await gw.close()
    await metrics_runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="codefleet gateway", description="The fleet's OpenAI endpoint in front of vllm-router.")
    p.add_argument("--config", required=True, help="gateway JSON config (written by `codefleet up`)")
    args = p.parse_args(argv)
    config = GatewayConfig.from_file(args.config)
    import uvloop

    uvloop.run(serve(config, os.environ.get(UPSTREAM_KEY_ENV) or None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
