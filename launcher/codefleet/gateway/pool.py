"""Keep-alive connections to the router (``Pool``), each carrying one exchange at a time
(``Upstream``: parses the router's answer and hands it to its exchange)."""

from __future__ import annotations

import asyncio
from typing import Protocol

import httptools


class Receiver(Protocol):
    """What an upstream connection reports to (``upstream.Exchange``)."""

    def upstream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    def upstream_body(self, body: bytes) -> None: ...

    def upstream_done(self) -> None: ...

    def upstream_lost(self, exc: Exception | None) -> None: ...


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

class Upstream(asyncio.Protocol):
    """One keep-alive connection to the router, carrying one exchange at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Receiver | None = None
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

    def send(self, exchange: Receiver, data: bytes) -> None:
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
