"""The in-vLLM middleware that adds a family's stops: merge rules and ASGI behaviour (fake app)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from codefleet.request_defaults import ENV_VAR, RequestDefaults, merge


def test_merge_adds_family_stops_and_keeps_the_clients() -> None:
    body = merge({"stop": "END", "stop_token_ids": [7]}, ["\n### Instruction:"], [0, 7])
    assert body["stop"] == ["END", "\n### Instruction:"]
    assert body["stop_token_ids"] == [7, 0]


def test_merge_without_family_stops_changes_nothing() -> None:
    assert merge({"messages": []}, [], []) == {"messages": []}


class _Tokenizer:
    def get_vocab(self) -> dict[str, int]:
        return {"<|im_end|>": 2, "<|endoftext|>": 0}


def _run(mw: RequestDefaults, path: str, body: bytes, renderer: Any = None) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg["body"]
            more = msg.get("more_body", False)
        seen["body"] = body
        seen["headers"] = dict(scope["headers"])

    engine = SimpleNamespace(renderer=renderer or SimpleNamespace(get_tokenizer=_Tokenizer))
    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", b"1")],
             "app": SimpleNamespace(state=SimpleNamespace(engine_client=engine))}
    chunks = [body[: len(body) // 2], body[len(body) // 2 :]]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    mw.app = app
    asyncio.run(mw(scope, receive, lambda m: asyncio.sleep(0)))  # type: ignore[arg-type]
    return seen


@pytest.fixture
def middleware(monkeypatch: pytest.MonkeyPatch) -> RequestDefaults:
    monkeypatch.setenv(ENV_VAR, json.dumps({"stop_tokens": ["<|im_end|>", "<|endoftext|>"], "stop": []}))
    return RequestDefaults(app=None)  # type: ignore[arg-type]


def test_chat_request_gets_stop_token_ids(middleware: RequestDefaults) -> None:
    seen = _run(middleware, "/v1/chat/completions", json.dumps({"model": "m", "messages": []}).encode())
    body = json.loads(seen["body"])
    assert body["stop_token_ids"] == [2, 0]
    assert seen["headers"][b"content-length"] == str(len(seen["body"])).encode()


def test_malformed_json_passes_through_for_vllm_to_refuse(middleware: RequestDefaults) -> None:
    seen = _run(middleware, "/v1/completions", b"{not json")
    assert seen["body"] == b"{not json"


def test_other_paths_untouched(middleware: RequestDefaults) -> None:
    seen = _run(middleware, "/tokenize", b'{"prompt": "x"}')
    assert seen["body"] == b'{"prompt": "x"}'
