"""The client side: one HTTP/1.1 connection, parsed by llhttp (``httptools``), with a public
server's limits (``codefleet.manifest.Limits``, nginx's defaults):

* the request head is bounded before it is parsed: a request target over the limit gets 414, a
  header block over it (or too many header lines) 431; llhttp never sees more than that, so a
  header dribbled in small pieces costs linear time and bounded memory;
* the key and ``Content-Length`` are checked when the head is complete, before any body byte is
  read; ``100 Continue`` is sent only after both pass, and only when no earlier answer on the
  connection is still being written (pipelining);
* timeouts: the whole head (from its first byte), each pause in a body and the body as a whole
  (a minimum average rate, as Apache's mod_reqtimeout ``MinRate``), an idle keep-alive
  connection, and a client that reads nothing of its answer;
* a chunked body is refused with 413 as soon as its declared chunk sizes pass the body limit;
* at the connection cap, the oldest connection with no request in progress (waiting for a head,
  or idle between requests) is closed to admit the new one, as nginx reuses its "reusable"
  connections; only when every connection has a request in progress is the new one refused;
* backpressure both ways: reading pauses while the client's answers are not being read or too
  many pipelined requests wait; the router connection pauses while the client is slow;
* a refused request is answered, then the connection is closed gracefully (write side first,
  what the client still sends is read and dropped for a bounded time), as nginx's lingering close;
* HEAD answers carry no body; HTTP/1.0 clients get no chunked encoding; Upgrade and CONNECT are
  refused once; request trailers are dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable
from typing import Protocol

import httptools

from codefleet.gateway import answers
from codefleet.gateway.answers import Rejection
from codefleet.gateway.wire import CONTINUE, head
from codefleet.manifest import Limits

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


class Handler(Protocol):
    """What a client connection needs of the gateway."""

    limits: Limits
    max_body: int

    def opened(self, client: Client) -> bool:
        """A new connection: admitted (True), or refused at the connection cap."""

    def closed(self, client: Client) -> None: ...

    def reusable(self, client: Client, idle: bool) -> None:
        """The connection has no request in progress (``idle``), or has one again."""

    def refused(self, reason: str) -> None:
        """Count an answer the connection gave itself."""

    def check_head(self, req: Request, content_length: int | None) -> Rejection | None:
        """The key and the size, with the head complete and before any body byte; sets ``req.tenant``."""

    def dispatch(self, client: Client, req: Request) -> None:
        """Answer ``req`` (in this connection's turn) or start forwarding it."""


class Attached(Protocol):
    """The forwarded request a connection is waiting on (``upstream.Exchange``)."""

    def client_gone(self) -> None: ...

    def pause_upstream(self) -> None: ...

    def resume_upstream(self) -> None: ...


class Client(asyncio.Protocol):
    """One client connection: requests answered in order (keep-alive, pipelining)."""

    def __init__(self, gw: Handler) -> None:
        self.gw = gw
        lim = self.limits = gw.limits
        self.max_body = gw.max_body
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
        self.exchange: Attached | None = None
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
        # the body: when it began, and the chunked framing seen so far (see _scan_chunks)
        self._body_began = 0.0
        self._chunked = False
        self._chunk_left = 0
        self._chunk_line = b""
        self._declared = 0
        self._tail = b""  # the last bytes of the previous read of a head (its end may straddle two)

    # -- transport -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not a subclass
        self.transport = t
        if not self.gw.opened(self):
            self.closed = True
            rej = answers.TOO_MANY_CONNECTIONS
            self.gw.refused(rej.reason)
            t.write(head(rej.status, [(b"Content-Type", b"application/json"),
                                      (b"Content-Length", str(len(rej.body)).encode()),
                                      *rej.headers, (b"Connection", b"close")]) + rej.body)
            t.close()
            return
        self.admitted = True
        self.gw.reusable(self, True)
        self._arm("head", self.limits.header_timeout_s)

    def evict(self) -> None:
        """Closed at the connection cap to admit a new connection (it had no request in progress);
        what it was still sending of an earlier answer is flushed first (the send timeout bounds it)."""
        if self.admitted:
            self.admitted = False
            self.gw.closed(self)
        self._disarm()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.admitted:
            self.admitted = False
            self.gw.closed(self)
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
            whole, done = data, self._completed
            room = self.head_limit - self._head_seen
            if len(data) > room:
                self._feed(data[:room])
                if self.closed or self._refused:
                    return
                if self._in_head and self._completed == done and not self._headers_done:
                    self._head_too_large()
                    return
                data = data[room:]
            else:
                self._head_seen += len(data)
            self._feed(data)
            if self._chunked and not self._refused and not self.closed:
                self._scan_first_chunks(whole, done)
            self._tail = whole[-3:]
            return
        elif self._timer_kind == "body":
            if not self._body_in_time(len(data)):
                return
            self._arm("body", self.limits.body_timeout_s)
            if self._chunked and not self._scan_chunks(data):
                return
            done = self._completed
            self._feed(data)
            if self._completed != done:
                self._chunked = False  # a pipelined message's head in this read: its framing is not followed
            return
        self._feed(data)

    def _body_in_time(self, arriving: int) -> bool:
        """A body must keep an average rate: after ``body_timeout_s``, at least ``body_min_bytes_per_s``
        bytes per second since it began (mod_reqtimeout's ``body=..,MinRate=..``; the pause
        timeout alone lets a body dribbled at one byte a second stay open for ever)."""
        rate = self.limits.body_min_bytes_per_s
        if not rate:
            return True
        took = time.monotonic() - self._body_began - self.limits.body_timeout_s
        if took <= 0 or (self._size + arriving) >= took * rate:
            return True
        self.refuse(answers.body_too_slow(rate))
        return False

    def _scan_first_chunks(self, data: bytes, completed_before: int) -> None:
        """The head of a chunked message ended in ``data``: scan what followed it. Only when no
        other message ended in the same read (then the head's end is the first blank line);
        otherwise the scan is left to llhttp for this message."""
        if self._completed != completed_before:
            self._chunked = False
            return
        seen = self._tail + data
        end = seen.find(b"\r\n\r\n")
        if end < 0:
            self._chunked = False
            return
        self._scan_chunks(seen[end + 4:])

    def _scan_chunks(self, data: bytes) -> bool:
        """Follow a chunked body's framing just far enough to read each chunk's declared size, so
        that a size past the body limit is refused at once (llhttp does not expose it and would
        wait for the bytes). llhttp still parses and checks everything; this stops at the last
        chunk or at anything it does not understand."""
        i, n = 0, len(data)
        while i < n:
            if self._chunk_left:
                step = min(self._chunk_left, n - i)
                self._chunk_left -= step
                i += step
                continue
            end = data.find(b"\n", i)
            line = self._chunk_line + (data[i:] if end < 0 else data[i:end])
            if len(line) > 64:  # a long extension: leave the message to llhttp
                self._chunked = False
                return True
            if end < 0:
                self._chunk_line = line
                return True
            self._chunk_line = b""
            i = end + 1
            text = line.split(b";", 1)[0].strip()
            if not text:
                continue  # the CRLF after a chunk's data
            if len(text) > 16 or text.lstrip(b"0123456789abcdefABCDEF"):
                self._chunked = False  # not a size line (int() would take "-4", "0x4", "4_0"): llhttp's to refuse
                return True
            size = int(text, 16)
            if size == 0:
                self._chunked = False  # the last chunk: trailers follow
                return True
            self._declared += size
            if self._declared > self.max_body:
                self.refuse(answers.too_large(self.max_body))
                return False
            self._chunk_left = size
        return True

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.refuse(answers.UPGRADE)
        except httptools.HttpParserError as exc:
            self.refuse(answers.malformed(exc))

    def _head_too_large(self) -> None:
        # A request target over its limit was refused by on_url already: what is left is headers.
        self.refuse(answers.header_block_too_large(self.max_header))

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.exchange is not None:
            self.exchange.pause_upstream()
        self._send_timer = self.loop.call_later(self.limits.send_timeout_s, self.abort)
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
                                          or len(self.queue) >= self.limits.max_pipelined)
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
            self.refuse(answers.timed_out(kind))
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
            self._arm("head", self.limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        if self._refused:
            return
        if len(self._url) + len(url) > self.max_target:
            self.refuse(answers.uri_too_long(self.max_target))
            return
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused or self._headers_done:
            return  # trailers of a chunked body are dropped
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        if self._header_count > self.limits.max_headers or self._header_bytes > self.max_header:
            self.refuse(answers.too_many_headers(self.limits.max_headers, self.max_header))
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
            self.refuse(answers.UPGRADE)
            return
        raw = req.header(b"content-length")
        length = int(raw) if raw is not None and raw.isdigit() else None
        rej = self.gw.check_head(req, length)
        if rej is not None:
            self.refuse(rej)
            return
        self.gw.reusable(self, False)  # a request is in progress from here (its key was accepted)
        encoding = req.header(b"transfer-encoding")
        if length or encoding is not None:
            self._arm("body", self.limits.body_timeout_s)
            self._body_began = time.monotonic()
            self._chunked = encoding is not None and b"chunked" in encoding.lower()
            self._chunk_left, self._chunk_line, self._declared = 0, b"", 0
            if (req.header(b"expect") or b"").lower() == b"100-continue":
                if self.busy or self.queue:
                    self._pending_continue = True  # after the answers before it, never inside one
                else:
                    self.write(CONTINUE)
        else:
            self._disarm()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._size += len(body)
        if self._size > self.max_body:
            self._body = []
            self.refuse(answers.too_large(self.max_body))
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
        self._chunked, self._tail = False, b""
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
        self.gw.refused(rej.reason)
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
                self.gw.reusable(self, False)
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
        if self.closed:
            return
        if not self.queue and self._in_head:  # not while a pipelined request's body is arriving
            self.gw.reusable(self, True)
        if self._pending_continue and not self.queue:
            self._pending_continue = False
            self.write(CONTINUE)
        if not self.queue and self._in_head and self._head_seen == 0 and self._timer_kind == "":
            self._arm("idle", self.limits.keepalive_timeout_s)
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
