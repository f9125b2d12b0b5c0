"""A stream whose replica is lost mid-answer continues on another replica (request migration).

The gateway sees every event it sends a client. For a stream it can continue (``continuable``) it
keeps those events (``Transcript``); when the replica fails (the router's connection cut, a clean end
without ``[DONE]``, or vLLM's in-band error event), it sends a *continuation* through the router:

- completions: the prompt followed by the text sent so far;
- chat: the messages plus a final assistant message holding that text, with vLLM's
  ``continue_final_message: true`` and ``add_generation_prompt: false`` (codefleet's templates put
  the content verbatim, so this renders exactly the first prompt plus the text);
- ``max_tokens`` / ``max_completion_tokens`` / ``min_tokens`` lowered by the tokens moved into the
  prompt, every other field (sampling, seed, stop) as the client sent it.

The continuation's events are rewritten to the first answer's ``id`` and ``created``, its second
role chunk is dropped, and its usage counts the first prompt once and every generated token once:
the tokens moved into the prompt are counted as completion tokens, not prompt tokens. How many
moved is read from a surviving engine's ``/tokenize`` (first prompt against the continuation's).

From token ids where it can: the gateway asks for ``return_token_ids`` (and takes them out of what
a client that did not ask gets), so it knows the first prompt's ids and every generated id. The
continuation then sends those ids as its prompt (completions: ``prompt`` as ids; chat: vLLM's
``kv_transfer_params.prompt_token_ids``, which skips templating), exactly the engine's own state.
But vLLM holds back text for stop strings and partial UTF-8 while its ids run ahead
(vllm/v1/engine/detokenizer.py), so the ids can cover text the client never got: the ids are used
only when a surviving engine's ``/detokenize`` of them gives exactly the text sent; otherwise the
continuation is built from the text (re-tokenized: measured in
benchmarks/scenarios/migration/README.md), and the engine regenerates anything held back.

Research with citations: docs/research/request-migration.md. Not continued (the error event as
before): ``n`` > 1, structured output, completions with ``echo``, ``logprobs``, ``suffix`` or a
prompt that is not one string. Any request is sent again whole when nothing of it reached the
client yet.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import ClientSession
from aiohttp.client_exceptions import ClientError

MAX_TRANSCRIPT = 8 * 1024 * 1024
"""Largest transcript kept for one stream (its events as sent); past it the stream is not continued."""
MAX_TRANSCRIPTS = 512 * 1024 * 1024
"""All transcripts of one gateway together; past it new events are not kept (those streams are not
continued) until streams end."""


class Budget:
    """Bytes held by all transcripts of one gateway."""

    def __init__(self, limit: int = MAX_TRANSCRIPTS) -> None:
        self.limit, self.used = limit, 0

#: vllm-router's plain-text errors when a worker failed (connect, send, or body read; its retries
#: used up): the request never reached the client, so it may be sent again.
ROUTER_FAILED = (b"Request failed", b"Failed to get response body", b"Stream error")

#: The fields ``return_token_ids`` adds to a stream's events (taken out for a client that did not ask).
_ID_FIELDS = re.compile(rb',"(?:prompt_token_ids|token_ids)":(?:\[[0-9,]*\]|null)|,"prompt_text":null')

#: Request fields that make text continuation wrong (the decoding state restarts from scratch).
_STRUCTURED = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
               "guided_decoding_backend", "truncate_prompt_tokens", "prompt_logprobs")
"""(and fields that would treat the continuation's longer prompt differently: cut it, score it)"""


def engine_died(data: bytes) -> bool:
    """Whether the in-band error event opening ``data`` is a server error (vLLM's EngineDeadError is
    ``{"error": {..., "type": "InternalServerError", "code": 500}}``: vllm/entrypoints/serve/
    exception_handling/error_response.py), not the request's own (a 400 passes through)."""
    try:
        err = orjson.loads(data[6:data.index(b"\n\n")] if b"\n\n" in data else data[6:]).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return False
    code = err.get("code") if isinstance(err, dict) else None
    return isinstance(code, int) and code >= 500


@dataclass(frozen=True)
class Settings:
    """The manifest's ``router.migration`` as the gateway holds it."""

    limit: int = 2
    """Continuations (and whole re-sends) per request; 0: never (the error event at once)."""
    timeout_s: float = 30.0
    """Each continuation must have started streaming within this long after the failure."""
    retry_s: float = 0.25
    """Pause between tries while no replica takes the continuation (each try is the router's own 5
    attempts, about 0.4 s, while the dead worker is still listed)."""


def continuable(chat: bool, payload: dict[str, Any]) -> bool:
    """Whether a stream of this request can be continued from its text."""
    if payload.get("n") not in (None, 1) or payload.get("echo") is True:
        return False
    if any(payload.get(k) is not None for k in _STRUCTURED):
        return False
    fmt = payload.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        return False
    if chat:
        return isinstance(payload.get("messages"), list)
    return isinstance(payload.get("prompt"), str) and payload.get("logprobs") is None and payload.get(
        "suffix") is None


def _choice(event: dict[str, Any]) -> dict[str, Any] | None:
    choices = event.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return None


def _events(data: bytes) -> Iterable[tuple[bytes, dict[str, Any] | None]]:
    """Each SSE event of ``data`` with its JSON (None for ``[DONE]`` and anything not JSON)."""
    for event in data.split(b"\n\n"):
        if not event:
            continue
        parsed = None
        if event.startswith(b"data: {"):
            try:
                parsed = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                parsed = None
        yield event, parsed if isinstance(parsed, dict) else None


class Transcript:
    """What one stream has sent its client, and how to continue it."""

    def __init__(self, chat: bool, payload: dict[str, Any], can_continue: bool, budget: Budget | None = None) -> None:
        self.chat = chat
        self.budget = budget or Budget()
        self.payload = payload
        """The request as the gateway sent it (with any ``stream_options`` it added)."""
        self.can_continue = can_continue
        self.strip_ids = False
        """The gateway asked for ``return_token_ids`` (the client did not): its fields are taken out."""
        if can_continue and payload.get("return_token_ids") is not True:
            payload["return_token_ids"] = self.strip_ids = True
        self.events: list[bytes] = []
        self.size = 0
        self.continuations = 0
        """Continuations and re-sends made so far."""
        self.moved = 0
        """Tokens of the text sent so far that the last continuation's prompt holds."""
        self.written = 0
        """Bytes of events written to the client (kept or not)."""
        self.rewriting = False
        """The stream now comes from a continuation (its events are rewritten)."""
        self.identity: tuple[Any, Any] | None = None
        """The first answer's ``id`` and ``created``."""
        self.prompt_ids: list[int] = []
        self.ids: list[int] = []

    @property
    def sent_any(self) -> bool:
        return self.written > 0

    def record(self, data: bytes) -> None:
        """Whole events about to be written to the client."""
        self.written += len(data)
        if not self.can_continue:
            return
        self.size += len(data)
        self.budget.used += len(data)
        if self.size > MAX_TRANSCRIPT or self.budget.used > self.budget.limit:
            self.can_continue, self.events = False, []
            self.release()
            return
        self.events.append(data)

    def release(self) -> None:
        """The stream ended (or stopped being kept): its bytes leave the budget."""
        self.budget.used -= self.size
        self.size = 0

    def for_client(self, data: bytes) -> bytes:
        """Events as the client gets them (without the token ids it did not ask for)."""
        return _ID_FIELDS.sub(b"", data) if self.strip_ids and b"token_ids" in data else data

    def sent(self) -> tuple[str, bool]:
        """The text the client got so far, and whether a choice already finished; the first
        prompt's token ids and the generated ones land in ``prompt_ids`` and ``ids``."""
        parts: list[str] = []
        finished = False
        self.prompt_ids, self.ids = [], []
        for data in self.events:
            for _, ev in _events(data):
                if ev is None:
                    continue
                if self.identity is None and "id" in ev:
                    self.identity = (ev.get("id"), ev.get("created"))
                c = _choice(ev)
                top = ev.get("prompt_token_ids") or (c or {}).get("prompt_token_ids")
                if not self.prompt_ids and isinstance(top, list):
                    self.prompt_ids = top
                if c is None:
                    continue
                if isinstance(c.get("token_ids"), list):
                    self.ids += c["token_ids"]
                if self.chat:
                    delta = c.get("delta")
                    if isinstance(delta, dict):
                        if delta.get("tool_calls"):
                            self.can_continue = False
                        if isinstance(delta.get("content"), str):
                            parts.append(delta["content"])
                elif isinstance(c.get("text"), str):
                    parts.append(c["text"])
                finished = finished or c.get("finish_reason") is not None
        return "".join(parts), finished

    # -- the continuation ---------------------------------------------------------------------

    def _continued(self, text: str) -> dict[str, Any]:
        p = dict(self.payload)
        if self.chat:
            messages = list(p["messages"])
            last = messages[-1] if messages else None
            if (p.get("continue_final_message") is True and isinstance(last, dict)
                    and isinstance(last.get("content"), str)):
                messages[-1] = {**last, "content": last["content"] + text}  # the client continued already
            else:
                messages.append({"role": "assistant", "content": text})
            p.update(messages=messages, add_generation_prompt=False, continue_final_message=True)
        else:
            p["prompt"] = p["prompt"] + text
        return p

    def ids_usable(self) -> bool:
        """vLLM uses chat's ``kv_transfer_params.prompt_token_ids`` only for text messages (it
        ignores them otherwise: vllm/renderers/online_renderer.py)."""
        return not self.chat or all(isinstance(m, dict) and isinstance(m.get("content"), str | None)
                                    for m in self.payload["messages"])

    def _most(self) -> int | None:
        if self.chat:
            for key in ("max_completion_tokens", "max_tokens"):
                if isinstance(self.payload.get(key), int):
                    return int(self.payload[key])
            return None
        most = self.payload.get("max_tokens")
        return most if isinstance(most, int) else 16  # vLLM's default for completions

    def left(self) -> int:
        """Tokens still to generate (by the ids sent so far); a large number when unbounded."""
        most = self._most()
        return 1 << 30 if most is None or not self.ids else most - len(self.ids)

    def length_end(self) -> bytes:
        """The last chunk of a stream whose tokens were all generated before the cut."""
        ident = self.identity or (None, None)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if self.chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        return b"data: " + orjson.dumps({"id": ident[0], "object": "chat.completion.chunk" if self.chat
                                         else "text_completion", "created": ident[1],
                                         "model": self.payload.get("model"), "choices": [choice]}) + b"\n\n"

    def tokenize_bodies(self, text: str) -> tuple[bytes, bytes]:
        """/tokenize bodies of the first prompt and of the continuation's (their difference is the
        number of tokens moved into the prompt)."""
        keys = (("model", "messages", "tools", "chat_template", "chat_template_kwargs", "add_generation_prompt",
                 "continue_final_message", "documents") if self.chat else ("model", "prompt", "add_special_tokens"))
        first = {k: self.payload[k] for k in keys if k in self.payload}
        cont = self._continued(text)
        return orjson.dumps(first), orjson.dumps({k: cont[k] for k in keys if k in cont})

    def continuation_body(self, text: str, moved: int, by_ids: bool = False) -> bytes:
        """The continuation of the text sent so far, whose prompt holds ``moved`` tokens more than
        the first (``tokens_moved``); ``by_ids``: its prompt is the first prompt's token ids and
        the generated ones (``sent``), ``moved`` their number."""
        self.moved = moved
        if by_ids:
            p = dict(self.payload)
            ids = self.prompt_ids + self.ids
            if self.chat:  # vLLM takes these as the prompt, templating skipped (renderers/online_renderer.py)
                kv = p.get("kv_transfer_params")
                p["kv_transfer_params"] = {**(kv if isinstance(kv, dict) else {}), "prompt_token_ids": ids}
            else:
                p["prompt"] = ids
        else:
            p = self._continued(text)
        p["echo"] = False
        most = self._most()
        if most is not None:
            key = "max_tokens" if not self.chat or "max_completion_tokens" not in p else "max_completion_tokens"
            p[key] = max(1, most - self.moved)
        if isinstance(p.get("min_tokens"), int):
            p["min_tokens"] = max(0, p["min_tokens"] - self.moved)
        return orjson.dumps(p)

    def rewrite(self, data: bytes) -> bytes:
        """A continuation's whole events as the first answer's: its ``id`` and ``created``, no second
        role chunk, usage that counts the moved tokens as completion tokens."""
        out = []
        for raw, ev in _events(data):
            if ev is None:
                out.append(raw)
                continue
            if self.identity is not None:
                ev["id"], ev["created"] = self.identity
            ev.pop("prompt_token_ids", None)  # the continuation's prompt: the client's was sent already
            ev.pop("prompt_text", None)
            c = _choice(ev)
            if c is not None:
                c.pop("prompt_token_ids", None)
            if self.chat and c is not None and isinstance(c.get("delta"), dict) and "role" in c["delta"]:
                delta = {k: v for k, v in c["delta"].items() if k != "role"}
                c["delta"] = delta
                if not delta.get("content") and c.get("finish_reason") is None and not c.get("logprobs"):
                    continue  # the continuation's own role chunk: the client had one
            usage = ev.get("usage")
            if isinstance(usage, dict) and self.moved:
                prompt = int(usage.get("prompt_tokens") or 0)
                usage["prompt_tokens"] = max(0, prompt - self.moved)
                usage["completion_tokens"] = int(usage.get("completion_tokens") or 0) + min(self.moved, prompt)
                details = usage.get("prompt_tokens_details")
                if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                    details["cached_tokens"] = min(details["cached_tokens"], usage["prompt_tokens"])
            out.append(b"data: " + orjson.dumps(ev))
        return b"".join(e + b"\n\n" for e in out)


async def detokenized(session: ClientSession, urls: Iterable[str], auth: bytes | None, model: str,
                      ids: list[int], failed: Callable[[str], None] = lambda url: None) -> str | None:
    """The text of ``ids`` as the first of the model's engines that answers decodes it."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = auth.decode()
    body = orjson.dumps({"model": model, "tokens": ids})
    for url in urls:
        try:
            async with session.post(url + "/detokenize", data=body, headers=headers) as r:
                if r.status == 200:
                    return str((await r.json(content_type=None))["prompt"])
        except (ClientError, TimeoutError, ValueError, KeyError, TypeError):
            failed(url)
            continue
    return None


async def tokens_moved(session: ClientSession, urls: Iterable[str], auth: bytes | None,
                       bodies: tuple[bytes, bytes], failed: Callable[[str], None] = lambda url: None) -> int | None:
    """How many more tokens the continuation's prompt has than the first, read from the first of
    ``urls`` (the model's engines) that answers both; None if none does."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = auth.decode()
    for url in urls:
        try:
            counts = []
            for body in bodies:
                async with session.post(url + "/tokenize", data=body, headers=headers) as r:
                    if r.status != 200:
                        raise ValueError(r.status)
                    counts.append(int((await r.json(content_type=None))["count"]))
            return max(0, counts[1] - counts[0])
        except (TimeoutError, ClientError, ValueError, KeyError, TypeError):
            failed(url)
            continue
    return None
