"""The router side: a keep-alive connection pool and one forwarded request (``Exchange``)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import httptools
import orjson

from codefleet.gateway.policy import error_body

if TYPE_CHECKING:
    from codefleet.gateway.http import Client, Request
    from codefleet.gateway.server import Gateway

_SSE_DONE = b"data: [DONE]\n\n"

#: Request headers not passed to the router (hop-by-hop, or set by the gate itself).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"host", b"content-length", b"authorization", b"content-type", b"expect",
})
#: Response headers not passed back to the client (the gate sets its own framing).
_RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server"})

IDLE_UPSTREAM = 512
"""Keep-alive connections to the router kept open when idle."""

MAX_CONNECTING = 64
"""New connections to the router that have not yet seen a byte from it. vllm-router 0.1.17 listens
with a backlog of 128 (``ss -ltn``); the kernel completes a handshake before the router accepts the
connection, so a burst of 1,000 new streams overflowed its accept queue (``nstat``
TcpExtListenOverflows: 100-200 per burst) and the dropped SYNs were retried a second or more later.
A new connection holds its permit until the router answers on it (so it was accepted), it closes,
or ``PERMIT_HOLD_S`` passes (a non-streamed answer may take minutes)."""

PERMIT_HOLD_S = 0.05

MAX_BUFFERED = 64 * 1024 * 1024
"""Largest non-streamed answer held whole before it is sent (a complete JSON document, so that a
router connection cut mid-answer becomes a 502 instead of a truncated body)."""


def head(status: int, headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]) -> bytes:
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, PHRASES.get(status, b""))]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _phrases() -> dict[int, bytes]:
    from http import HTTPStatus

    return {s.value: s.phrase.encode() for s in HTTPStatus}


PHRASES = _phrases()


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the router, carrying one exchange at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
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

    def send(self, exchange: Exchange, data: bytes) -> None:
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


class Pool:
    def __init__(self, addr: tuple[str, int]) -> None:
        self.addr = addr
        self.idle: list[Upstream] = []
        self.connecting = asyncio.Semaphore(MAX_CONNECTING)

    def take(self) -> Upstream | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def connect(self) -> Upstream:
        loop = asyncio.get_running_loop()
        await self.connecting.acquire()
        try:
            _, proto = await loop.create_connection(lambda: Upstream(self), *self.addr)
        except BaseException:
            self.connecting.release()
            raise
        proto.permit = True
        loop.call_later(PERMIT_HOLD_S, proto.release_permit)
        return proto

    def release(self, conn: Upstream) -> None:
        conn.release_permit()  # returned unused (its client left): the router may never write on it
        if len(self.idle) < IDLE_UPSTREAM:
            self.idle.append(conn)
        else:
            conn.abort()

    def discard(self, conn: Upstream) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle.clear()


class Exchange:
    """One request forwarded to the router and its answer sent back.

    Streamed answers (SSE) pass through chunk by chunk; everything else is held whole and sent
    with its length, so a cut from the router is a 502 rather than a truncated document. A stream
    cut after its head was sent ends with an OpenAI error event and ``[DONE]``.
    """

    def __init__(self, gw: Gateway, client: Client, req: Request, model: str, stream: bool) -> None:
        self.gw = gw
        self.client = client
        self.req = req
        self.model = model
        self.stream = stream
        self.conn: Upstream | None = None
        self.retried = False
        self.fresh = True
        self.status = 0
        self.mode = ""  # "chunked" | "raw" (HTTP/1.0 client, close-delimited) | "buffer"
        self.out: list[tuple[bytes, bytes]] = []
        self.content_type = b""
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.tail = b""
        self._finished = False
        #: Admitted for a tenant (its slot is freed and its tokens charged when this ends).
        self.tenant = ""
        self.admitted = False
        self.admitted_at = 0.0
        self.body: bytes | None = None
        """The body sent instead of the client's (a stream asked for its usage)."""
        self.usage: dict[str, Any] | None = None
        self.scan = False
        """Read the stream's events for the usage chunk (and drop it when ``strip_usage``)."""
        self.strip_usage = False
        self.sse = b""
        #: Held for a replica (scale from zero): since when, and the hold timeout's timer.
        self.held_at = 0.0
        self.hold_timer: asyncio.TimerHandle | None = None

    @property
    def finished(self) -> bool:
        return self._finished

    @finished.setter
    def finished(self, value: bool) -> None:
        if value and not self._finished and self.admitted:
            self.admitted = False
            self.gw.settled(self)
        self._finished = value

    def admit(self, tenant: str, body: bytes | None) -> None:
        """Admitted for ``tenant``; ``body``: the client's with ``stream_options.include_usage`` added
        (the usage chunk is then taken out of what the client gets)."""
        self.tenant, self.admitted = tenant, True
        self.admitted_at = time.monotonic()
        self.scan = self.stream
        if body is not None:
            self.body, self.strip_usage = body, True

    def _count(self, status: str) -> None:
        self.gw.count(self.model, status, self.tenant)

    def _request_bytes(self) -> bytes:
        req, gw = self.req, self.gw
        body = self.body if self.body is not None else req.body
        parts = [b"POST ", req.path, b" HTTP/1.1\r\nHost: ", gw.upstream_host,
                 b"\r\nContent-Type: application/json\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
        if gw.upstream_auth:
            parts += (b"Authorization: ", gw.upstream_auth, b"\r\n")
        for name, value in req.headers:
            if name not in HOP_BY_HOP:
                parts += (name, b": ", value, b"\r\n")
        parts += (b"\r\n", body)
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

    def _send(self, conn: Upstream) -> None:
        self.conn = conn
        self.fresh = not conn.used
        conn.send(self, self._request_bytes())

    # -- from the router -----------------------------------------------------------------------

    def upstream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        chunked_source = True
        for name, value in headers:
            low = name.lower()
            if low == b"content-type":
                self.content_type = value
            elif low == b"content-length":
                chunked_source = False
            if low not in _RESPONSE_DROP:
                self.out.append((name, value))
        if not self.stream or status >= 400 or not chunked_source:
            self.mode = "buffer"
            return
        out = self.out
        if self.req.http10:
            self.mode = "raw"
            out.append((b"Connection", b"close"))
        else:
            self.mode = "chunked"
            out.append((b"Transfer-Encoding", b"chunked"))
            if not self.req.keep_alive:
                out.append((b"Connection", b"close"))
        self._count(str(status))
        self.client.write(head(status, out))

    def _scan_events(self, body: bytes, final: bool = False) -> bytes:
        """Whole SSE events of ``body`` (a partial one waits for the rest): the usage chunk is
        recorded, and dropped when the client did not ask for it."""
        data = self.sse + body
        cut = len(data) if final else data.rfind(b"\n\n") + 2
        if cut < 2:
            self.sse = data
            return b""
        self.sse, data = data[cut:], data[:cut]
        if b'"usage"' not in data:
            return data
        out = []
        for event in data.split(b"\n\n"):
            if event.startswith(b"data: {") and b'"usage"' in event:
                try:
                    chunk = orjson.loads(event[6:])
                except orjson.JSONDecodeError:
                    chunk = None
                if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict) and not chunk.get("choices"):
                    self.usage = chunk["usage"]
                    if self.strip_usage:
                        continue
            out.append(event)
        return b"\n\n".join(out)

    def upstream_body(self, body: bytes) -> None:
        if self.scan and self.mode in ("chunked", "raw"):
            body = self._scan_events(body)
            if not body:
                return
        if self.mode == "chunked":
            self.client.write(b"%x\r\n%b\r\n" % (len(body), body))
            self.tail = (self.tail + body)[-16:]
        elif self.mode == "raw":
            self.client.write(body)
            self.tail = (self.tail + body)[-16:]
        else:
            self.buffered += len(body)
            if self.buffered > MAX_BUFFERED:
                if self.conn is not None:
                    self.conn.exchange = None
                    self.conn.abort()
                    self.conn = None
                self._fail(f"The answer for model `{self.model}` is larger than {MAX_BUFFERED} bytes.")
                return
            self.buffer.append(body)

    def upstream_done(self) -> None:
        self.conn = None
        if self.finished:
            return
        if self.scan and self.sse and self.mode in ("chunked", "raw"):
            self.scan, rest = False, self._scan_events(b"", final=True)
            if rest:
                self.upstream_body(rest)
        if self.mode == "buffer":
            self._send_buffered()
            return
        if self.stream and self.status < 400 and not self.tail.endswith(_SSE_DONE):
            self._stream_error("the replica's stream ended early")
        if self.mode == "chunked":
            self.client.write(b"0\r\n\r\n")
            self._finish(self.req.keep_alive)
        else:
            self._finish(False)

    def _send_buffered(self) -> None:
        body = b"".join(self.buffer)
        self.buffer = []
        if self.status >= 400 and b"json" not in self.content_type:
            self._wrap_error(body.decode(errors="replace").strip())
            return
        if self.admitted and self.status < 400:
            try:
                answer = orjson.loads(body)
                self.usage = answer.get("usage") if isinstance(answer, dict) else None
            except orjson.JSONDecodeError:
                pass
        self.finished = True
        self._count(str(self.status))
        self.client.respond(self.status, body, content_type=None, headers=self.out)

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
        elif self.mode == "buffer":
            self._fail(f"The router's answer for model `{self.model}` was cut "
                       f"({type(exc).__name__ if exc else 'connection closed'}); retry the request.")
        else:
            # Mid-stream (the replica or the router died): the status line is gone, so end the
            # stream with an error event, which the OpenAI SDK raises as APIError.
            self._stream_error(f"the replica failed mid-stream ({type(exc).__name__ if exc else 'connection closed'})")
            if self.mode == "chunked":
                self.client.write(b"0\r\n\r\n")
                self._finish(self.req.keep_alive)
            else:
                self._finish(False)

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

    def cut(self, why: str) -> None:
        """End this exchange now (the gateway is stopping): a stream gets an error event and
        ``[DONE]``; an answer not yet started gets a 503."""
        if self.finished:
            return
        if self.conn is not None:
            self.conn.exchange = None
            self.conn.abort()
            self.conn = None
        if self.mode in ("chunked", "raw"):
            self._stream_error(why)
            if self.mode == "chunked":
                self.client.write(b"0\r\n\r\n")
            self._finish(False)
        else:
            self.finished = True
            self._count("503")
            self.client.respond(503, error_body(f"Generation for model `{self.model}` was interrupted: {why}; "
                                                f"retry the request.", type_="server_error", code="shutting_down"),
                                headers=((b"Retry-After", b"5"),), keep_alive=False)

    # -- endings -------------------------------------------------------------------------------

    def _reset(self) -> None:
        """Back to not started (the router refused it before any byte reached the client)."""
        self.status, self.mode, self.out, self.content_type = 0, "", [], b""
        self.buffer, self.buffered, self.tail, self.retried = [], 0, b"", False
        self.client.exchange = None

    def _finish(self, keep_alive: bool) -> None:
        if not self.finished:
            self.finished = True
            self.client.done(keep_alive)

    def _fail(self, message: str) -> None:
        if self.finished:
            return
        self.finished = True
        self._count("502")
        self.client.respond(502, error_body(message, type_="server_error", code="upstream_unavailable"))

    def _stream_error(self, why: str) -> None:
        self._count("stream_aborted")
        err = error_body(f"Generation for model `{self.model}` was interrupted: {why}; retry the request.",
                         type_="server_error", code="stream_interrupted")
        event = b"data: " + err + b"\n\n" + _SSE_DONE
        self.client.write(b"%x\r\n%b\r\n" % (len(event), event) if self.mode == "chunked" else event)

    def _wrap_error(self, text: str) -> None:
        """The router's plain-text errors in OpenAI's shape, keeping the status."""
        if self.status == 503 and "No available workers" in text:
            self._reset()
            self.gw.router_has_none(self)
            return
        self.finished = True
        self._count(str(self.status))
        type_ = "invalid_request_error" if self.status < 500 else "server_error"
        self.client.respond(self.status, error_body(text or f"upstream status {self.status}", type_=type_))
