"""The gate's decisions as plain functions over a parsed request: keys, paths, body shapes.

Nothing here touches a socket; ``codefleet.gateway.http`` calls these and writes the answers.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import orjson

from codefleet.gateway.config import FORWARDED


@dataclass(frozen=True)
class Rejection:
    """An answer the gate gives itself: status, OpenAI error body, extra headers, metric reason."""

    status: int
    body: bytes
    reason: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> bytes:
    """OpenAI's error shape."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def reject(status: int, message: str, code: str, reason: str, *, param: str | None = None,
           headers: tuple[tuple[bytes, bytes], ...] = ()) -> Rejection:
    type_ = "invalid_request_error" if status < 500 else "server_error"
    return Rejection(status, error_body(message, type_=type_, param=param, code=code), reason, headers)


def authorized(authorization: bytes | None, digests: tuple[bytes, ...]) -> bool:
    """``Authorization: Bearer KEY`` whose SHA-256 is one of ``digests``; every key when none are set."""
    if not digests:
        return True
    scheme, _, token = (authorization or b"").partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return False
    digest = hashlib.sha256(token).digest()
    ok = False
    for known in digests:  # no early exit: the same time for every key
        ok |= hmac.compare_digest(digest, known)
    return ok


UNAUTHORIZED = reject(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                      "invalid_api_key", "unauthorized", headers=((b"WWW-Authenticate", b"Bearer"),))


def check_head(method: bytes, path: bytes, authorization: bytes | None, content_length: int | None,
               digests: tuple[bytes, ...], max_body: int) -> Rejection | None:
    """What can be refused once the head is read, before any body byte: the key, then the size."""
    if path == b"/health":
        return None
    if not authorized(authorization, digests):
        return UNAUTHORIZED
    if content_length is not None and content_length > max_body:
        return too_large(max_body)
    return None


def too_large(max_body: int) -> Rejection:
    return reject(413, f"The request body is larger than {max_body} bytes.", "request_too_large", "too_large")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: Roles of OpenAI's own message types, whose ``content`` vLLM takes as any iterable of parts.
_OPENAI_ROLES = frozenset({"system", "developer", "user", "assistant"})


def _content_ok(role: str, content: Any) -> bool:
    """vLLM 0.32's rules, found with its request models (tests/unit/test_gateway_policy.py)."""
    if isinstance(content, str):
        return True
    if content is None:
        return role == "assistant"
    if role in _OPENAI_ROLES:
        return isinstance(content, list | dict)
    return isinstance(content, list) and all(isinstance(p, dict) for p in content)


def _check_messages(messages: Any) -> tuple[str, str] | None:
    if not isinstance(messages, list):
        return "`messages` must be a list of message objects", "messages"
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            return f"`{where}` must be an object with `role` and `content`", where
        role = m.get("role")
        if not isinstance(role, str):
            return f"`{where}.role` must be a string", f"{where}.role"
        if "content" in m and not _content_ok(role, m["content"]):
            return (f"`{where}.content` must be a string or a list of content parts"
                    + (" (or null for an assistant message)" if m["content"] is None else ""), f"{where}.content")
        if "name" in m and not isinstance(m["name"], str):
            return f"`{where}.name` must be a string", f"{where}.name"
    return None


def _check_prompt(payload: dict[str, Any]) -> tuple[str, str] | None:
    prompt = payload.get("prompt")
    if prompt is None:
        if payload.get("prompt_embeds") is not None:
            return None
        return "`prompt` is required (a string, a list of strings, or token ids)", "prompt"
    if isinstance(prompt, str):
        return None
    if isinstance(prompt, list) and (all(isinstance(p, str) for p in prompt) or all(_is_int(p) for p in prompt)
                                     or all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt)):
        return None
    return "`prompt` must be a string, a list of strings, a list of token ids or a list of such lists", "prompt"


def check_body(path: bytes, body: bytes) -> tuple[dict[str, Any], str] | Rejection:
    """The parsed body and its model, or why it is refused. A light structural check of what vLLM
    itself refuses (vllm-router re-serializes bodies and would let some of these through)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return reject(400, f"The request body is not valid JSON: {exc}.", "invalid_json", "invalid_json")
    if not isinstance(payload, dict):
        return reject(400, f"The request body must be a JSON object, not {type(payload).__name__}.",
                      "invalid_json", "invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return reject(400, "The request needs a `model` (a string); GET /v1/models lists them.", "missing_model",
                      "missing_model", param="model")
    problem = _check_messages(payload.get("messages")) if path == FORWARDED_CHAT else _check_prompt(payload)
    if problem is not None:
        return reject(400, problem[0] + ".", "invalid_request", "invalid_body", param=problem[1])
    return payload, model


FORWARDED_CHAT = FORWARDED[0].encode()
