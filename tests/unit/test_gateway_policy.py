"""The gate's decisions without sockets: keys, head checks, and body shapes checked against vLLM's
own request models (what the gate refuses, vLLM refuses too, and the other way round)."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import pytest

from codefleet.gateway.policy import Rejection, authorized, check_body, check_head

DIGESTS = (hashlib.sha256(b"sk-1").digest(), hashlib.sha256(b"sk-2").digest())


@pytest.mark.parametrize(("header", "ok"), [
    (b"Bearer sk-1", True), (b"bearer sk-2", True), (b"Bearer  sk-1 ", True), (b"Bearer sk-3", False),
    (b"Basic sk-1", False), (b"Bearer", False), (None, False), (b"sk-1", False),
])
def test_authorized(header: bytes | None, ok: bool) -> None:
    assert authorized(header, DIGESTS) is ok
    assert authorized(header, ()) is True


def test_check_head_order_key_then_size() -> None:
    assert check_head(b"GET", b"/health", None, None, DIGESTS, 10) is None
    r = check_head(b"POST", b"/v1/completions", None, 10**10, DIGESTS, 10)
    assert r is not None and r.status == 401  # the key first: no size hint to a keyless client
    r = check_head(b"POST", b"/v1/completions", b"Bearer sk-1", 11, DIGESTS, 10)
    assert r is not None and r.status == 413
    assert check_head(b"POST", b"/v1/completions", b"Bearer sk-1", 10, DIGESTS, 10) is None


CHAT: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "x"}]},
    {"messages": [{"role": "input", "content": "x"}]},
    {"messages": [{"role": "user"}]},
    {"messages": []},
    {"messages": [{"role": "user", "content": ["a"]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
    {"messages": [{"role": "assistant", "content": None}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": 5, "content": "x"}]},
    {"messages": "hi"},
    {"messages": [{"role": "user", "content": None}]},
    {"messages": [{"role": "user", "content": "x", "name": 5}]},
    {"messages": ["x"]},
    {"messages": [{"role": "user", "content": [5]}]},
    {"messages": [{"role": "user", "content": {"type": "text"}}]},
    {"messages": [{"role": "user", "content": True}]},
    {"messages": [{"role": "system", "content": 1.5}]},
    {"messages": [{"role": "tool", "content": [5]}]},
    {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": [{"role": "input", "content": {"a": 1}}]},
    {"messages": [{"role": "input", "content": [{"type": "text", "text": "a"}]}]},
    {"messages": [{"role": "assistant", "content": [None]}]},
]
COMPLETION: list[dict[str, Any]] = [
    {"prompt": "x"}, {"prompt": [1, 2]}, {"prompt": [[1], [2]]}, {"prompt": ["a", "b"]}, {"prompt": []},
    {"prompt": 5}, {}, {"prompt": None}, {"prompt": [1.5]}, {"prompt": {"a": 1}}, {"prompt": ["a", 1]},
    {"prompt": [[1], "a"]},
]


def vllm_accepts(path: bytes, body: dict[str, Any]) -> bool:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    model = ChatCompletionRequest if path == b"/v1/chat/completions" else CompletionRequest
    try:
        model.model_validate(body)
    except Exception:  # pydantic's ValidationError or vLLM's own ValueError
        return False
    return True


@pytest.mark.parametrize(("path", "body"), [(b"/v1/chat/completions", b) for b in CHAT]
                         + [(b"/v1/completions", b) for b in COMPLETION])
def test_body_check_agrees_with_vllm(path: bytes, body: dict[str, Any]) -> None:
    full = {"model": "m", **body}
    ours = check_body(path, orjson.dumps(full))
    assert (not isinstance(ours, Rejection)) == vllm_accepts(path, full), ours


@pytest.mark.parametrize(("body", "code", "param"), [
    (b"{", "invalid_json", None), (b"[1]", "invalid_json", None), (b'{"prompt": "x"}', "missing_model", "model"),
    (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "invalid_request", "messages[0].content"),
])
def test_body_rejections_name_the_field(body: bytes, code: str, param: str | None) -> None:
    r = check_body(b"/v1/chat/completions", body)
    assert isinstance(r, Rejection) and r.status == 400
    err = orjson.loads(r.body)["error"]
    assert err["code"] == code and err["param"] == param
