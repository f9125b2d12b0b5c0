"""HTTP/1.1 and server-sent-events framing: what goes on the wire, written once."""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}
"""Reason phrases of the status line."""

SSE_DONE = b"data: [DONE]\n\n"
"""The OpenAI stream's last event."""
LAST_CHUNK = b"0\r\n\r\n"
"""The end of a chunked body (no trailers)."""
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def head(status: int, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A response's status line and header block."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, PHRASES.get(status, b""))]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def sse_event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"
