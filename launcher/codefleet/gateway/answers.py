"""Every answer the gateway gives itself, built in one place: OpenAI's error shape, a status, the
metric reason it is counted under, and extra headers. Callers name the answer; none builds one."""

from __future__ import annotations

import math
from dataclasses import dataclass

import orjson

from codefleet.gateway.wire import SSE_DONE, sse_event


@dataclass(frozen=True)
class Rejection:
    """An answer the gate gives itself: status, OpenAI error body, extra headers, metric reason;
    ``close``: the connection is closed after it."""

    status: int
    body: bytes
    reason: str
    headers: tuple[tuple[bytes, bytes], ...] = ()
    close: bool = False


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> bytes:
    """OpenAI's error shape."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def reject(status: int, message: str, code: str | None, reason: str, *, param: str | None = None,
           headers: tuple[tuple[bytes, bytes], ...] = (), close: bool = False) -> Rejection:
    type_ = "invalid_request_error" if status < 500 else "server_error"
    return Rejection(status, error_body(message, type_=type_, param=param, code=code), reason, headers, close)


def _retry(seconds: int) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"Retry-After", str(seconds).encode()),)


# -- the connection and its head --------------------------------------------------------------

UNAUTHORIZED = reject(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                      "invalid_api_key", "unauthorized", headers=((b"WWW-Authenticate", b"Bearer"),))
TOO_MANY_CONNECTIONS = reject(503, "Too many open connections; retry shortly.", "too_many_connections",
                              "connection_limit", headers=((b"Retry-After", b"1"),), close=True)
UPGRADE = reject(400, "Protocol upgrades (Upgrade, CONNECT) are not supported.", "bad_request", "bad_request")


def malformed(why: object) -> Rejection:
    return reject(400, f"Malformed HTTP request: {why}.", "bad_request", "bad_request")


def uri_too_long(limit: int) -> Rejection:
    return reject(414, f"The request target is longer than {limit} bytes.", "uri_too_long", "uri_too_long")


def header_block_too_large(limit: int) -> Rejection:
    return reject(431, f"The request's header block is larger than {limit} bytes.", "headers_too_large",
                  "headers_too_large")


def too_many_headers(lines: int, limit: int) -> Rejection:
    return reject(431, f"The request has more than {lines} header lines or {limit} bytes of headers.",
                  "headers_too_large", "headers_too_large")


def timed_out(part: str) -> Rejection:
    return reject(408, f"The request {part} did not arrive in time.", "request_timeout", "timeout")


def body_too_slow(min_rate: int) -> Rejection:
    return reject(408, f"The request body arrived slower than {min_rate} bytes/s on average.", "request_timeout",
                  "timeout")


def too_large(max_body: int) -> Rejection:
    return reject(413, f"The request body is larger than {max_body} bytes.", "request_too_large", "too_large")


# -- paths and bodies ---------------------------------------------------------------------------

def unknown_path(path: str, served: str) -> Rejection:
    return reject(404, f"Unknown path {path}. This endpoint serves {served} and /v1/models.", "unknown_url",
                  "unknown_path")


def not_allowed(method: str, path: str, allow: bytes) -> Rejection:
    return reject(405, f"Method {method} is not allowed on {path}.", "method_not_allowed", "unknown_path",
                  headers=((b"Allow", allow),))


def unknown_model(name: str, served: list[str]) -> Rejection:
    return reject(404, f"The model `{name}` does not exist. Served models: {', '.join(served)}.", "model_not_found",
                  "unknown_model", param="model")


def no_fill(name: str, capable: list[str]) -> Rejection:
    can = f"Models that do: {', '.join(capable)}." if capable else "No model of this fleet does."
    return reject(400, f"The model `{name}` does not fill in the middle, so `suffix` cannot be used with it. {can}",
                  "fim_not_supported", "fim_not_supported", param="suffix")


def invalid_json(why: str) -> Rejection:
    return reject(400, why, "invalid_json", "invalid_json")


MISSING_MODEL = reject(400, "The request needs a `model` (a string); GET /v1/models lists them.", "missing_model",
                       "missing_model", param="model")


def invalid_body(message: str, param: str) -> Rejection:
    return reject(400, message, "invalid_request", "invalid_body", param=param)


# -- the fleet's state ------------------------------------------------------------------------

SHUTTING_DOWN = reject(503, "The endpoint is shutting down; retry shortly.", "shutting_down", "shutting_down",
                       headers=_retry(5), close=True)


def no_replica(model: str) -> Rejection:
    return reject(503, f"Model `{model}` has no ready replica right now; retry shortly.", "model_unavailable",
                  "no_replica", headers=_retry(5))


def model_starting(model: str, why: str, retry_s: int) -> Rejection:
    return reject(503, f"Model `{model}` has no ready replica yet (one is starting); {why}. Retry in {retry_s} s.",
                  "model_starting", "hold", headers=_retry(retry_s))


def overloaded(model: str, depth: float, limit: int, rate: float, wait: float) -> Rejection:
    return reject(429, f"Model `{model}` is overloaded: {depth:.0f} requests waiting in its engines (limit "
                       f"{limit}), draining at {rate:.1f}/s. Retry in {wait:.1f} s.", "model_overloaded",
                  "overloaded", headers=((b"retry-after-ms", str(math.ceil(wait * 1000)).encode()),
                                         (b"retry-after", str(math.ceil(wait)).encode())))


# -- the router's side ------------------------------------------------------------------------

def upstream_unavailable(message: str) -> Rejection:
    return reject(502, message, "upstream_unavailable", "upstream")


def interrupted(model: str, why: str) -> Rejection:
    """An answer not yet started when the gateway stopped."""
    return reject(503, f"Generation for model `{model}` was interrupted: {why}; retry the request.",
                  "shutting_down", "shutting_down", headers=_retry(5), close=True)


def router_error(status: int, text: str) -> Rejection:
    """The router's plain-text errors in OpenAI's shape, keeping the status."""
    return reject(status, text or f"upstream status {status}", None, "upstream")


def stream_interrupted(model: str, why: str) -> bytes:
    """The events that end a stream cut after its head was sent (the OpenAI SDK raises APIError)."""
    err = error_body(f"Generation for model `{model}` was interrupted: {why}; retry the request.",
                     type_="server_error", code="stream_interrupted")
    return sse_event(err) + SSE_DONE
