"""ASGI middleware loaded inside vLLM (``--middleware``): a family's stops on every request, and
fill in the middle for a model that does it.

vLLM's ``--override-generation-config`` carries sampling defaults but no stop strings, and it
drops special tokens from the text before matching stop strings. So this middleware adds the
family's stop tokens as ``stop_token_ids`` (resolved once with the engine's own tokenizer) and
its stop strings to ``stop`` of every chat and completion request. It is part of the format, not
a preference: a client's own stops are kept and the family's are added to them.

Fill in the middle (codefleet.fim): for a model with a format, the middleware gives the engine's
renderer its ``render_completion_suffix`` (the hook vLLM 0.32 calls for a completion's ``suffix``,
implemented by DeepSeek-V4's renderer only), so vLLM renders the fill prompt and refuses what it
refuses with ``suffix`` itself; a completion with a ``suffix`` also gets the format's fill stops.
Why here and not in the gateway: the hook keeps vLLM's own checks and messages for ``suffix`` (they
run before the hook), it runs beside the engine's tokenizer (the markers are checked against it),
and it serves a client of the engine alone too. Cost is no reason either way: measured per fill
body (1,500 + 500 characters), the render adds 0.27 us here, on top of the 16.9 us JSON round trip
this middleware pays for every body already; in the gateway, parse, render and re-serialize would
take 2.7 us against 1.5 us for the parse it does now (benchmarks/scenarios/editor/README.md).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from codefleet.fim import get_format

ENV_VAR = "CODEFLEET_REQUEST_DEFAULTS"
PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
COMPLETIONS = "/v1/completions"
log = logging.getLogger("codefleet.request_defaults")

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
        self.fim = get_format(config["fim"]) if config.get("fim") else None
        self.fim_stop_ids: list[int] = []

    def _token_ids(self, scope: Scope) -> list[int]:
        if self.stop_token_ids is None:
            renderer = scope["app"].state.engine_client.renderer
            vocab = renderer.get_tokenizer().get_vocab()
            self.stop_token_ids = [vocab[t] for t in self.stop_tokens if t in vocab]
            if self.fim is not None:
                self._install_fim(renderer, vocab)
        return self.stop_token_ids

    def _install_fim(self, renderer: Any, vocab: dict[str, int]) -> None:
        fim = self.fim
        assert fim is not None
        missing = [t for t in fim.markers if t not in vocab]
        if missing:  # the text would be split into pieces, not the markers the model was trained on
            log.error("fill in the middle (%s) is off: the tokenizer has no %s; vLLM refuses `suffix`",
                      fim.name, ", ".join(missing))
            return
        log.info("fill in the middle: %s (%s)", fim.name,
                 ", ".join(f"{t} {vocab[t]}" for t in fim.markers))
        self.fim_stop_ids = [vocab[t] for t in fim.stop_tokens if t in vocab]
        # an instance attribute over the method of vLLM's renderer class (vllm/renderers/base.py)
        renderer.render_completion_suffix = fim.render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.stop_token_ids is None and scope["type"] == "http":
            self._token_ids(scope)  # the first request of any kind (a health probe) sets the fill hook
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
            stop, stop_ids = self.stop, self._token_ids(scope)
            if self.fim_stop_ids and body.get("suffix") is not None and scope["path"] == COMPLETIONS:
                # a fill: the format's stops; the family's stop strings belong to its chat format
                # (granite-code's "Answer:" could be in the code)
                stop, stop_ids = [], stop_ids + [t for t in self.fim_stop_ids if t not in stop_ids]
            raw = json.dumps(merge(body, stop, stop_ids)).encode()
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
