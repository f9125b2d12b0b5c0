"""The gate's decisions as plain functions over a parsed request: keys, paths, body shapes.

Nothing here touches a socket; ``codefleet.gateway.http`` calls these and writes the answers
(built in ``codefleet.gateway.answers``).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import orjson

from codefleet.gateway import answers
from codefleet.gateway.answers import UNAUTHORIZED, Rejection
from codefleet.gateway.config import FORWARDED


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


def check_head(method: bytes, path: bytes, authorization: bytes | None, content_length: int | None,
               digests: tuple[bytes, ...], max_body: int) -> Rejection | None:
    """What can be refused once the head is read, before any body byte: the key, then the size."""
    if path == b"/health":
        return None
    if not authorized(authorization, digests):
        return UNAUTHORIZED
    if content_length is not None and content_length > max_body:
        return answers.too_large(max_body)
    return None


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
        return answers.invalid_json(f"The request body is not valid JSON: {exc}.")
    if not isinstance(payload, dict):
        return answers.invalid_json(f"The request body must be a JSON object, not {type(payload).__name__}.")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return answers.MISSING_MODEL
    problem = _check_messages(payload.get("messages")) if path == FORWARDED_CHAT else _check_prompt(payload)
    if problem is not None:
        return answers.invalid_body(problem[0] + ".", problem[1])
    return payload, model


def check_fill(model: str, payload: dict[str, Any], fim: dict[str, str], max_body_bytes: int) -> Rejection | None:
    """A completion with a ``suffix``: refused for a model that does not fill (vLLM 0.32 would
    refuse it too, without naming the models that can), and bounded: vLLM copies the suffix into
    every prompt of a list before any length check, so a list times the suffix is held to the
    body limit."""
    if model not in fim:
        return answers.no_fill(model, sorted(fim))
    suffix, prompt = payload["suffix"], payload.get("prompt")
    if not isinstance(suffix, str):
        return answers.invalid_body("`suffix` must be a string.", "suffix")
    if isinstance(prompt, list) and len(prompt) * (len(suffix) + 64) > max_body_bytes:
        return answers.invalid_body(f"{len(prompt)} prompts, each filled with a {len(suffix)}-character suffix, "
                                    f"are more than the {max_body_bytes}-byte request limit.", "suffix")
    return None


FORWARDED_CHAT = FORWARDED[0].encode()
FORWARDED_COMPLETIONS = FORWARDED[1].encode()
