"""The client side: one HTTP/1.1 connection, parsed by llhttp (``httptools``), with a public
server's limits (``codefleet.manifest.Limits``, nginx's defaults):

* the request head is bounded before it is parsed: a request target over the limit gets 414, a
  header block over it (or too many header lines) 431; llhttp never sees more than that, so a
  header dribbled in small pieces costs linear time and bounded memory;
* the key and ``Content-Length`` are checked when the head is complete, before any body byte is
  read; ``100 Continue`` is sent only after both pass, and only when no earlier answer on the
  connection is still being written (pipelining);
* timeouts: the whole head (from its first byte), each pause in a body, an idle keep-alive
  connection, and a client that reads nothing of its answer;
* backpressure both ways: reading pauses while the client's answers are not being read or too
  many pipelined requests wait; the router connection pauses while the client is slow;
* a refused request is answered, then the connection is closed gracefully (write side first,
  what the client still sends is read and dropped for a bounded time), as nginx's lingering close;
* HEAD answers carry no body; HTTP/1.0 clients get no chunked encoding; Upgrade and CONNECT are
  refused once; request trailers are dropped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

import httptools

from codefleet.gateway.policy import Rejection, check_head, reject, too_large
from codefleet.gateway.upstream import head

if TYPE_CHECKING:
    from codefleet.gateway.server import Gateway
    from codefleet.gateway.upstream import Exchange

LINGER_S = 2.0
"""How long a refused connection's remaining input is read and dropped before it is closed."""
LINGER_BYTES = 1024 * 1024
"""... and how much of it at most."""


class Request:
    __slots__ = ("method", "path", "headers", "body", "keep_alive", "http10", "rejection", "tenant")

    def __init__(self) -> None:
        self.method = b""
        self.path = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.keep_alive = True
        self.http10 = False
        self.rejection: Rejection | None = None
        self.tenant = ""

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


class Client(asyncio.Protocol):
    """One client connection: requests answered in order (keep-alive, pipelining)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        lim = gw.config.limits
        self.max_target = lim.max_request_target_kib * 1024
        self.max_header = lim.max_header_kib * 1024
        self.head_limit = self.max_target + self.max_header + 1024
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.req = Request()
        self._url = b""
        self._body: list[bytes] = []
        self._size = 0
        self.queue: deque[Request] = deque()
        self.busy = False
        self.closed = False
        self.admitted = False
        self.current: Request | None = None
        self.exchange: Exchange | None = None
        self._dispatching = False
        # head accounting
        self._in_head = True
        self._head_seen = 0
        self._headers_done = False
        self._header_bytes = 0
        self._header_count = 0
        self._completed = 0
        # state
        self._refused = False  # the current message was refused at its head: the rest is not parsed
        self._lingering = False
        self._linger_bytes = 0
        self._pending_continue = False
        self._read_paused = False
        self._write_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""
        self._send_timer: asyncio.TimerHandle | None = None

    # -- transport -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not a subclass
        self.transport = t
        if not self.gw.admit():
            self.closed = True
            self.gw.rejected.labels("connection_limit").inc()
            rej = reject(503, "Too many open connections; retry shortly.", "too_many_connections", "connection_limit")
            t.write(head(503, [(b"Content-Type", b"application/json"),
                               (b"Content-Length", str(len(rej.body)).encode()),
                               (b"Retry-After", b"1"), (b"Connection", b"close")]) + rej.body)
            t.close()
            return
        self.admitted = True
        self._arm("head", self.gw.config.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.admitted:
            self.admitted = False
            self.gw.release()
        self._disarm()
        if self._send_timer is not None:
            self._send_timer.cancel()
        if self.exchange is not None:
            self.exchange.client_gone()
            self.exchange = None

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._lingering:
            self._linger_bytes += len(data)
            if self._linger_bytes > LINGER_BYTES:
                self.abort()
            return
        if self._in_head:
            room = self.head_limit - self._head_seen
            if len(data) > room:
                done = self._completed
                self._feed(data[:room])
                if self.closed or self._refused:
                    return
                if self._in_head and self._completed == done and not self._headers_done:
                    self._head_too_large()
                    return
                data = data[room:]
            else:
                self._head_seen += len(data)
        elif self._timer_kind == "body":
            self._arm("body", self.gw.config.limits.body_timeout_s)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.refuse(reject(400, "Protocol upgrades (Upgrade, CONNECT) are not supported.", "bad_request",
                               "bad_request"))
        except httptools.HttpParserError as exc:
            self.refuse(reject(400, f"Malformed HTTP request: {exc}.", "bad_request", "bad_request"))

    def _head_too_large(self) -> None:
        # A request target over its limit was refused by on_url already: what is left is headers.
        self.refuse(reject(431, f"The request's header block is larger than {self.max_header} bytes.",
                           "headers_too_large", "headers_too_large"))

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.exchange is not None:
            self.exchange.pause_upstream()
        self._send_timer = self.loop.call_later(self.gw.config.limits.send_timeout_s, self.abort)
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self.exchange is not None:
            self.exchange.resume_upstream()
        self._update_reading()
        self._next()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def abort(self) -> None:
        """Drop the connection now (a timeout, a client that does not read)."""
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True

    def _update_reading(self) -> None:
        if self.transport is None or self.closed:
            return
        paused = not self._lingering and (self._write_paused or self._refused
                                          or len(self.queue) >= self.gw.config.limits.max_pipelined)
        if paused != self._read_paused:
            self._read_paused = paused
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # -- timers --------------------------------------------------------------------------------

    def _arm(self, kind: str, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(seconds, self._timeout, kind)
        self._timer_kind = kind

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_kind = ""

    def _timeout(self, kind: str) -> None:
        self._timer = None
        self._timer_kind = ""
        if kind in ("head", "body") and not self.busy and not self.queue and not self._refused:
            self.gw.rejected.labels("timeout").inc()
            self.refuse(reject(408, f"The request {'head' if kind == 'head' else 'body'} did not arrive in time.",
                               "request_timeout", "timeout"))
        else:
            self.abort()  # idle keep-alive, lingering done, or a timeout behind an answer in progress

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self.req = Request()
        self._url = b""
        self._body = []
        self._size = 0
        if self._timer_kind in ("", "idle"):
            self._arm("head", self.gw.config.limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        if self._refused:
            return
        if len(self._url) + len(url) > self.max_target:
            self.refuse(reject(414, f"The request target is longer than {self.max_target} bytes.",
                               "uri_too_long", "uri_too_long"))
            return
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused or self._headers_done:
            return  # trailers of a chunked body are dropped
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        if self._header_count > self.gw.config.limits.max_headers or self._header_bytes > self.max_header:
            self.refuse(reject(431, f"The request has more than {self.gw.config.limits.max_headers} header lines "
                                    f"or {self.max_header} bytes of headers.", "headers_too_large",
                               "headers_too_large"))
            return
        self.req.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._headers_done = True
        self._in_head = False
        self._head_seen = 0
        req, parser = self.req, self.parser
        req.method = parser.get_method()
        req.keep_alive = parser.should_keep_alive()
        req.http10 = parser.get_http_version() == "1.0"
        req.path = self._url.split(b"?", 1)[0]
        if req.method == b"CONNECT" or parser.should_upgrade():
            self.refuse(reject(400, "Protocol upgrades (Upgrade, CONNECT) are not supported.", "bad_request",
                               "bad_request"))
            return
        raw = req.header(b"content-length")
        length = int(raw) if raw is not None and raw.isdigit() else None
        rej = check_head(req.method, req.path, req.header(b"authorization"), length, self.gw.digests,
                         self.gw.config.max_body_bytes)
        if rej is not None:
            self.refuse(rej)
            return
        if self.gw.admission.enabled:
            req.tenant = self.gw.tenant_of(req.header(b"authorization"))
        if length or req.header(b"transfer-encoding") is not None:
            self._arm("body", self.gw.config.limits.body_timeout_s)
            if (req.header(b"expect") or b"").lower() == b"100-continue":
                if self.busy or self.queue:
                    self._pending_continue = True  # after the answers before it, never inside one
                else:
                    self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        else:
            self._disarm()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._size += len(body)
        if self._size > self.gw.config.max_body_bytes:
            self._body = []
            self.refuse(too_large(self.gw.config.max_body_bytes))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self.req.body = b"".join(self._body)
        self._body = []
        self._in_head = True
        self._head_seen = 0
        self._headers_done = False
        self._header_bytes = self._header_count = 0
        self._completed += 1
        self._pending_continue = False
        self._disarm()
        self.queue.append(self.req)
        self._update_reading()
        self._next()

    # -- answering -----------------------------------------------------------------------------

    def refuse(self, rej: Rejection) -> None:
        """Answer ``rej`` for the current message in its turn and close the connection; nothing
        more of its input is parsed."""
        if self._refused or self.closed:
            return
        self._refused = True
        self._disarm()
        self.gw.rejected.labels(rej.reason).inc()
        req = self.req
        req.rejection = rej
        req.keep_alive = False
        self.queue.append(req)
        self._update_reading()
        self._next()

    def _next(self) -> None:
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self.queue and not self.busy and not self.closed and not self._write_paused:
                self.busy = True
                self.current = req = self.queue.popleft()
                if req.rejection is not None:
                    r = req.rejection
                    self.respond(r.status, r.body, headers=r.headers, keep_alive=False)
                else:
                    self.gw.dispatch(self, req)
        finally:
            self._dispatching = False
        self._update_reading()

    def respond(self, status: int, body: bytes, *, content_type: bytes | None = b"application/json",
                headers: Iterable[tuple[bytes, bytes]] = (), keep_alive: bool | None = None) -> None:
        req = self.current
        keep = (req.keep_alive if req is not None else False) if keep_alive is None else keep_alive
        hdrs = [(b"Content-Type", content_type)] if content_type is not None else []
        hdrs += [(b"Content-Length", str(len(body)).encode()), *headers]
        if not keep:
            hdrs.append((b"Connection", b"close"))
        self.write(head(status, hdrs) + (b"" if req is not None and req.method == b"HEAD" else body))
        self.done(keep)

    def done(self, keep_alive: bool) -> None:
        """The current request is answered."""
        self.exchange = None
        self.current = None
        if not keep_alive:
            self._linger()
            return
        self.busy = False
        if self._pending_continue and not self.queue:
            self._pending_continue = False
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not self.queue and self._in_head and self._head_seen == 0 and self._timer_kind == "":
            self._arm("idle", self.gw.config.limits.keepalive_timeout_s)
        self._next()

    def _linger(self) -> None:
        """Close gracefully: our side first, then read and drop what the client still sends."""
        self.busy = True
        self.queue.clear()
        if self.closed or self.transport is None:
            return
        self._lingering = True
        self._update_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm("linger", LINGER_S)
