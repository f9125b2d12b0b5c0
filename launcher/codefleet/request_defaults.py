"""ASGI middleware loaded inside vLLM (``--middleware``): a family's stops on every request.

vLLM's ``--override-generation-config`` carries sampling defaults but no stop strings, and it
drops special tokens from the text before matching stop strings. So this middleware adds the
family's stop tokens as ``stop_token_ids`` (resolved once with the engine's own tokenizer) and
its stop strings to ``stop`` of every chat and completion request. It is part of the format, not
a preference: a client's own stops are kept and the family's are added to them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

ENV_VAR = "CODEFLEET_REQUEST_DEFAULTS"
PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def merge(body: dict[str, Any], stop: list[str], stop_token_ids: list[int]) -> dict[str, Any]:
    """The request with the family's stops added (client values kept, no duplicates)."""
    if stop:
        given = body.get("stop")
        given_list = [given] if isinstance(given, str) else list(given or [])
        body["stop"] = given_list + [s for s in stop if s not in given_list]
    if stop_token_ids:
        given_ids = list(body.get("stop_token_ids") or [])
        body["stop_token_ids"] = given_ids + [t for t in stop_token_ids if t not in given_ids]
    return body


class RequestDefaults:
    def __init__(self, app: App) -> None:
        self.app = app
        config = json.loads(os.environ.get(ENV_VAR, "{}"))
        self.stop: list[str] = list(config.get("stop", []))
        self.stop_tokens: list[str] = list(config.get("stop_tokens", []))
        self.stop_token_ids: list[int] | None = None

    def _token_ids(self, scope: Scope) -> list[int]:
        if self.stop_token_ids is None:
            tokenizer = scope["app"].state.engine_client.renderer.get_tokenizer()
            vocab = tokenizer.get_vocab()
            self.stop_token_ids = [vocab[t] for t in self.stop_tokens if t in vocab]
        return self.stop_token_ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in PATHS:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict):
            raw = json.dumps(merge(body, self.stop, self._token_ids(scope))).encode()
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = dict(scope, headers=[*headers, (b"content-length", str(len(raw)).encode())])
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        await self.app(scope, replay, send)
