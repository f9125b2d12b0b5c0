"""One request forwarded to the router and its answer sent back (``Exchange``).

An exchange talks to the gateway through ``Host`` (its pool, counting, settling a tenant's
request, a model the router had no worker for) and to its client through ``http.Client``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import orjson

from codefleet.gateway import answers
from codefleet.gateway.affinity import SESSION_HEADER
from codefleet.gateway.answers import Rejection
from codefleet.gateway.http import Client, Request
from codefleet.gateway.migrate import ROUTER_FAILED, Settings, Transcript, engine_died
from codefleet.gateway.pool import Pool, Upstream
from codefleet.gateway.wire import LAST_CHUNK, SSE_DONE, chunk, head

#: Request headers not passed to the router (hop-by-hop, or set by the gate itself).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"host", b"content-length", b"authorization", b"content-type", b"expect",
})
#: Response headers not passed back to the client (the gate sets its own framing).
_RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server"})

MAX_BUFFERED = 64 * 1024 * 1024
"""Largest non-streamed answer held whole before it is sent (a complete JSON document, so that a
router connection cut mid-answer becomes a 502 instead of a truncated body)."""


class Host(Protocol):
    """What an exchange needs of the gateway."""

    pool: Pool
    upstream_host: bytes
    upstream_auth: bytes | None
    active: set[Exchange]
    """Exchanges in flight: an exchange leaves it when it ends."""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    def count(self, model: str, status: str, tenant: str = "") -> None: ...

    def settled(self, exchange: Exchange) -> None:
        """An admitted exchange has ended (free its tenant's slot, charge its tokens)."""

    def router_has_none(self, exchange: Exchange) -> None:
        """The router had no worker for the exchange's model."""

    migration: Settings

    def migrated(self, model: str, outcome: str, how: str = "") -> None:
        """Count a continuation or re-send (``codefleet_gateway_migrations_total``); ``how``: a
        continuation's prompt (ids, text, or whole: nothing had been sent)."""

    async def tokens_moved(self, model: str, bodies: tuple[bytes, bytes]) -> int | None:
        """migrate.tokens_moved against the model's engines."""

    async def detokenized(self, model: str, ids: list[int]) -> str | None:
        """migrate.detokenized against the model's engines."""

    async def look_again(self) -> None:
        """Read the router's worker list now (a replica was lost)."""


class Exchange:
    """One request forwarded to the router and its answer sent back.

    Streamed answers (SSE) pass through chunk by chunk; everything else is held whole and sent
    with its length, so a cut from the router is a 502 rather than a truncated document. A stream
    cut after its head was sent ends with an OpenAI error event and ``[DONE]``.
    """

    def __init__(self, gw: Host, client: Client, req: Request, model: str, stream: bool) -> None:
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
        self.finished = False
        """Answered, cut or abandoned: nothing more is written (set through ``end``)."""
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
        #: Prefix affinity's session key (sent as x-session-id), and what to call when this ends.
        self.session: bytes | None = None
        self.on_end: Callable[[], None] | None = None
        #: Migration (gateway/migrate.py): what a stream sent, continuations and re-sends made, and
        #: while a continuation waits for its head, the future its answer settles.
        self.transcript: Transcript | None = None
        self.migrations = 0
        self.resuming: asyncio.Future[bool] | None = None
        self.resume_status = 0
        """The status a continuation was refused with (0: none, or its connection failed)."""
        self.errored = False
        """The replica's answer held vLLM's in-band error event."""

    def end(self) -> None:
        """Nothing more is written for this exchange; an admitted one is settled with its tenant."""
        if self.finished:
            return
        self.finished = True
        self.gw.active.discard(self)
        if self.transcript is not None:
            self.transcript.release()
        if self.on_end is not None:
            self.on_end()
            self.on_end = None
        if self.admitted:
            self.admitted = False
            self.gw.settled(self)

    def reject(self, rej: Rejection) -> None:
        """Answer ``rej`` instead of forwarding (held too long, no replica, shutting down)."""
        if self.finished:
            return
        self.end()
        self._count(str(rej.status))
        self.client.respond(rej.status, rej.body, headers=rej.headers, keep_alive=False if rej.close else None)

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
        if self.session is not None:
            parts += (SESSION_HEADER, b": ", self.session, b"\r\n")
        for name, value in req.headers:
            if name not in HOP_BY_HOP and not (self.session is not None and name == SESSION_HEADER):
                parts += (name, b": ", value, b"\r\n")
        parts += (b"\r\n", body)
        return b"".join(parts)

    def start(self) -> None:
        if self.client.closed:
            self.end()  # left while it waited (a tenant's slot is freed)
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
        if self.resuming is not None:  # a continuation: the client has its head already
            if status < 400:
                if self.transcript is not None:  # its events are rewritten from the first one on
                    self.transcript.rewriting = self.transcript.sent_any
                self._resumed(True)
            else:
                self.resume_status, self.buffer, self.buffered = status, [], 0
            return
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
        recorded, and dropped when the client did not ask for it. With a transcript: a
        continuation's events rewritten, and what is sent recorded."""
        data = self.sse + body
        cut = len(data) if final else data.rfind(b"\n\n") + 2
        if cut < 2:
            self.sse = data
            return b""
        self.sse, data = data[cut:], data[:cut]
        t = self.transcript
        if t is None:
            return self._usage_of(data)
        at = data.find(b'data: {"error"')
        if at >= 0 and engine_died(data[at:]):
            # vLLM's in-band 5xx (its engine died under a live API server): what came before it
            # is sent; the rest of this answer (the error and [DONE]) is not. A request's own
            # error (a 400) passes through as it is.
            data, self.sse = data[:at], b""
            self.errored = True
        if t.rewriting and data:
            data = t.rewrite(data)
        data = self._usage_of(data)
        if data:
            t.record(data)
        return t.for_client(data)

    def _usage_of(self, data: bytes) -> bytes:
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
        if self.resuming is not None:  # a continuation's error answer (its start kept for the message)
            if self.buffered < 65536:
                self.buffer.append(body[:65536])
                self.buffered += len(body)
            return
        if self.scan and self.mode in ("chunked", "raw"):
            body = self._scan_events(body)
            if self.errored:
                if body:
                    self._write(body)
                self._replica_failed("the replica reported an error")
                return
            if not body:
                return
        if self.mode in ("chunked", "raw"):
            self._write(body)
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

    def _write(self, body: bytes) -> None:
        self.client.write(chunk(body) if self.mode == "chunked" else body)
        self.tail = (self.tail + body)[-16:]

    def upstream_done(self) -> None:
        self.conn = None
        if self.finished:
            return
        if self.resuming is not None:
            self._resumed(False)
            return
        if self.scan and self.sse and self.mode in ("chunked", "raw"):
            if self.transcript is not None:
                self.sse = b""  # a partial event is not sent (the answer is continued or ended)
            else:
                self.scan, rest = False, self._scan_events(b"", final=True)
                if rest:
                    self.upstream_body(rest)
        if self.mode == "buffer":
            self._send_buffered()
            return
        if self.stream and self.status < 400 and not self.tail.endswith(SSE_DONE):
            self._replica_failed("the replica's stream ended early")
            return
        self._end_stream(None, self.req.keep_alive)

    def _send_buffered(self) -> None:
        body = b"".join(self.buffer)
        self.buffer = []
        if self.status >= 400 and b"json" not in self.content_type:
            if self.status >= 500 and body.startswith(ROUTER_FAILED) and self._resend():
                return
            self._wrap_error(body.decode(errors="replace").strip())
            return
        if self.admitted and self.status < 400:
            try:
                answer = orjson.loads(body)
                self.usage = answer.get("usage") if isinstance(answer, dict) else None
            except orjson.JSONDecodeError:
                pass
        self.end()
        self._count(str(self.status))
        self.client.respond(self.status, body, content_type=None, headers=self.out)

    def upstream_lost(self, exc: Exception | None) -> None:
        self.conn = None
        if self.finished:
            return
        if self.resuming is not None:
            self._resumed(False)
            return
        if not self.status:
            if not self.fresh and not self.retried and not self.client.closed:
                # A kept-alive connection the router had just closed: once more on a new one.
                self.retried = True
                self.gw.spawn(self._connect())
                return
            if not self._resend():
                self._fail(f"The router did not answer for model `{self.model}`: "
                           f"{exc or 'connection closed before a response'}.")
        elif self.mode == "buffer":
            if not self._resend():
                self._fail(f"The router's answer for model `{self.model}` was cut "
                           f"({type(exc).__name__ if exc else 'connection closed'}); retry the request.")
        else:
            # Mid-stream (the replica or the router died): continued elsewhere, or (the status line
            # is gone) ended with an error event, which the OpenAI SDK raises as APIError.
            self._replica_failed(f"the replica failed mid-stream ({type(exc).__name__ if exc else 'connection closed'})")

    # -- from the client -----------------------------------------------------------------------

    def client_gone(self) -> None:
        self.end()
        if self.resuming is not None:
            self._resumed(False)
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
        if self.resuming is not None:
            self._resumed(False)
        if self.mode in ("chunked", "raw"):
            self._end_stream(why, False)
        else:
            self.reject(answers.interrupted(self.model, why))

    # -- endings -------------------------------------------------------------------------------

    def _reset(self) -> None:
        """Back to not started (the router refused it before any byte reached the client)."""
        self.status, self.mode, self.out, self.content_type = 0, "", [], b""
        self.buffer, self.buffered, self.tail, self.retried = [], 0, b"", False
        self.client.exchange = None

    def _end_stream(self, why: str | None, keep_alive: bool) -> None:
        """The end of a streamed answer whose head was sent: with ``why``, an error event and
        ``[DONE]`` first (a stream is never closed bare); then the last chunk."""
        if self.finished:
            return
        if why is not None:
            self._count("stream_aborted")
            event = answers.stream_interrupted(self.model, why)
            self.client.write(chunk(event) if self.mode == "chunked" else event)
        if self.mode == "chunked":
            self.client.write(LAST_CHUNK)
        self.end()
        self.client.done(keep_alive if self.mode == "chunked" else False)

    def _fail(self, message: str) -> None:
        self.reject(answers.upstream_unavailable(message))

    def _wrap_error(self, text: str) -> None:
        """The router's plain-text errors in OpenAI's shape, keeping the status."""
        if self.status == 503 and "No available workers" in text:
            self._reset()
            self.gw.router_has_none(self)
            return
        self.reject(answers.router_error(self.status, text))

    # -- migration (gateway/migrate.py) --------------------------------------------------------

    def _replica_failed(self, why: str) -> None:
        """The stream's replica failed after its head was sent: continue it elsewhere, or end it
        with the error event."""
        if self.conn is not None:
            self.conn.exchange = None
            self.conn.abort()
            self.conn = None
        self.errored, self.sse = False, b""  # a partial event of the lost answer is never sent
        t, limit = self.transcript, self.gw.migration.limit
        if t is None or self.client.closed or self.migrations >= limit:
            if t is not None and limit:
                self.gw.migrated(self.model, "exhausted" if self.migrations else "client_gone")
            self._end_stream(why, self.req.keep_alive)
            return
        self.migrations += 1
        self.gw.spawn(self._continue(why))

    async def _continue(self, why: str) -> None:
        try:
            await self._continuing(why)
        except Exception as exc:  # never a stream left open: whatever failed, the error event
            self.gw.migrated(self.model, "failed")
            self._end_stream(f"{why}; its continuation failed ({type(exc).__name__})", self.req.keep_alive)

    async def _continuing(self, why: str) -> None:
        t, s = self.transcript, self.gw.migration
        assert t is not None
        if self.finished:
            return
        deadline = time.monotonic() + s.timeout_s
        text, finished = t.sent()
        if finished or t.left() <= 0:  # every choice had finished, or no token is left to generate
            if not finished:
                self._write(t.length_end())
            self._write(SSE_DONE)
            self.gw.migrated(self.model, "finished")
            self._end_stream(None, self.req.keep_alive)
            return
        if t.sent_any and not t.can_continue:
            self.gw.migrated(self.model, "not_continuable")
            self._end_stream(why, self.req.keep_alive)
            return
        body: bytes | None = None if t.sent_any else orjson.dumps(t.payload)
        how, bodies = "whole", None
        while not self.finished:
            if time.monotonic() > deadline:
                self.gw.migrated(self.model, "timeout")
                self._end_stream(f"{why}; no other replica took it within {s.timeout_s:g} s", self.req.keep_alive)
                return
            if body is None and t.ids and t.prompt_ids and t.ids_usable():
                # from the engine's own token ids when they decode to exactly the text sent
                decoded = await self.gw.detokenized(self.model, t.ids)
                if decoded == text:
                    body, how = t.continuation_body(text, len(t.ids), by_ids=True), "ids"
            if body is None:
                bodies = bodies or t.tokenize_bodies(text)
                moved = await self.gw.tokens_moved(self.model, bodies)
                if moved is not None:
                    body, how = t.continuation_body(text, moved), "text"
            if body is not None and not self.finished and await self._try(body, deadline):
                self.gw.migrated(self.model, "continued", how)
                return
            if 400 <= self.resume_status < 500 and self.resume_status not in (408, 429):
                # refused for what it is (not for want of a replica): the engine's or router's words
                message = b"".join(self.buffer).decode(errors="replace").strip()[:2000]
                self.gw.migrated(self.model, "refused")
                self._end_stream(f"{why}; its continuation was refused ({self.resume_status}: {message})",
                                 self.req.keep_alive)
                return
            await asyncio.sleep(s.retry_s)
            await self.gw.look_again()
        self.gw.migrated(self.model, "client_gone")

    async def _try(self, body: bytes, deadline: float) -> bool:
        """Send ``body`` as this stream's next attempt; True once the router answered its head with
        success (the events then flow through ``upstream_body`` as before)."""
        try:
            conn = await asyncio.wait_for(self.gw.pool.connect(), max(0.1, deadline - time.monotonic()))
        except (TimeoutError, OSError):
            return False
        if self.finished:
            self.gw.pool.release(conn)
            return False
        self.body, self.resuming = body, asyncio.get_running_loop().create_future()
        self.resume_status, self.buffer, self.buffered, self.sse = 0, [], 0, b""
        self._send(conn)
        try:
            return await asyncio.wait_for(asyncio.shield(self.resuming), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            self._resumed(False)
            if self.conn is not None:
                self.conn.exchange = None
                self.conn.abort()
                self.conn = None
            return False

    def _resumed(self, ok: bool) -> None:
        fut, self.resuming = self.resuming, None
        if fut is not None and not fut.done():
            fut.set_result(ok)
        if not ok and self.conn is not None:
            self.conn.exchange = None
            self.conn.abort()
            self.conn = None

    def _resend(self) -> bool:
        """Nothing reached the client and the router's own retries failed (or its connection was
        cut): send the request again whole after a pause, if the budget allows."""
        if self.client.closed or self.migrations >= self.gw.migration.limit:
            return False
        self.migrations += 1
        self._reset()
        self.gw.spawn(self._resend_later())
        return True

    async def _resend_later(self) -> None:
        await asyncio.sleep(self.gw.migration.retry_s)
        await self.gw.look_again()
        if self.finished:  # answered meanwhile (the gateway stopping) or the client left
            return
        self.gw.migrated(self.model, "resent")
        self.start()

