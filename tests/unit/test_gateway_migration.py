"""Request migration in-process (gateway/migrate.py): a stream whose replica fails goes on through a
continuation, against a router written here that fails on purpose and answers /tokenize (fault
injection; the same on real engines: tests/e2e/test_migration.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import orjson
import pytest

from codefleet.gateway.migrate import Transcript, continuable
from tests.unit.test_gateway_exchange import FakeRouter, with_gateway

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def event(obj: dict[str, Any] | str) -> bytes:
    return chunk(b"data: " + (obj.encode() if isinstance(obj, str) else orjson.dumps(obj)) + b"\n\n")


def text_chunk(text: str, rid: str = "cmpl-1", created: int = 100, finish: str | None = None) -> bytes:
    return event({"id": rid, "object": "text_completion", "created": created, "model": "m",
                  "choices": [{"index": 0, "text": text, "finish_reason": finish}]})


class Router(FakeRouter):
    """FakeRouter that lists itself as the model's one engine (for /tokenize: one token per
    character of the prompt, or of the messages' contents) and keeps every request body."""

    bodies: list[dict[str, Any]] = []

    def __init__(self, behaviour: Any) -> None:
        super().__init__(behaviour)
        self.body = b""

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self.body = b""

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        assert self.transport is not None
        if self.url == b"/workers":
            body = json.dumps({"workers": [{"model_id": "m", "is_healthy": True,
                                            "url": f"http://127.0.0.1:{Router.port}"}]}).encode()
        elif self.url == b"/detokenize":  # token id n is the character chr(n)
            body = json.dumps({"prompt": "".join(map(chr, json.loads(self.body)["tokens"]))}).encode()
        elif self.url == b"/tokenize":
            req = json.loads(self.body)
            text = req["prompt"] if "prompt" in req else "".join(m["content"] for m in req["messages"])
            body = json.dumps({"count": len(text)}).encode()
        else:
            Router.bodies.append(json.loads(self.body))
            self.n += 1
            self.behaviour(self, self.transport, self.url, self.n)
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))


async def run(behaviour: Any, client: Any, **config: Any) -> None:
    Router.bodies = []
    config["migration"] = {"retry_s": 0.05, "timeout_s": 3, **config.get("migration", {})}
    await with_gateway(behaviour, client, fake=Router, **config)


def sse(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.split("\n\n"):
        if line.startswith("data: {"):
            out.append(json.loads(line[6:]))
    return out


def test_a_cut_completion_stream_continues_with_the_text_sent_so_far() -> None:
    def behaviour(router: FakeRouter, t: Any, path: bytes, n: int) -> None:
        if len(Router.bodies) == 1:
            t.write(HEAD + text_chunk("ab") + text_chunk("c"))
            t.close()  # the replica died
        else:
            t.write(HEAD + text_chunk("de", "cmpl-2", 200) + text_chunk("f", "cmpl-2", 200, "length")
                    + event({"id": "cmpl-2", "object": "text_completion", "created": 200, "model": "m", "choices": [],
                             "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}})
                    + event("[DONE]") + b"0\r\n\r\n")

    async def client(c: httpx.AsyncClient) -> None:
        body = {"model": "m", "prompt": "x", "stream": True, "max_tokens": 6, "min_tokens": 5, "temperature": 0,
                "stream_options": {"include_usage": True}}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            text = (await r.aread()).decode()
        events = sse(text)
        assert "error" not in text and text.endswith("data: [DONE]\n\n")
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == "abcdef"
        assert {(e["id"], e["created"]) for e in events} == {("cmpl-1", 100)}  # one stream to the client
        # the prompt once (1 token), every generated token once (3 moved + 2 generated after)
        assert events[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
        first, cont = Router.bodies
        assert cont["prompt"] == "xabc" and cont["max_tokens"] == 3 and cont["min_tokens"] == 2
        assert cont["temperature"] == 0 and cont["echo"] is False
        metrics = (await c.get("/health")).status_code  # the connection stays usable
        assert metrics == 200

    gws: list[Any] = []
    asyncio.run(run(behaviour, client, seen=gws))
    samples = {s.labels["outcome"]: s.value for m in gws[0].metrics.registry.collect()
               if m.name == "codefleet_gateway_migrations" for s in m.samples}
    assert samples == {"continued": 1.0}


def test_a_chat_stream_cut_by_vllms_error_event_continues_the_final_assistant_message() -> None:
    def chat(delta: dict[str, Any], rid: str, finish: str | None = None) -> bytes:
        return event({"id": rid, "object": "chat.completion.chunk", "created": 7 if rid == "a" else 9, "model": "m",
                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    def behaviour(router: FakeRouter, t: Any, path: bytes, n: int) -> None:
        if len(Router.bodies) == 1:
            # vLLM's in-band error (EngineCore died under a live API server), then [DONE]
            t.write(HEAD + chat({"role": "assistant", "content": ""}, "a") + chat({"content": "Hel"}, "a")
                    + event({"error": {"message": "EngineCore encountered an issue", "code": 500}})
                    + event("[DONE]") + b"0\r\n\r\n")
        else:
            t.write(HEAD + chat({"role": "assistant", "content": ""}, "b") + chat({"content": "lo"}, "b", "stop")
                    + event("[DONE]") + b"0\r\n\r\n")

    async def client(c: httpx.AsyncClient) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "max_completion_tokens": 10}
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            text = (await r.aread()).decode()
        events = sse(text)
        assert "error" not in text and text.endswith("data: [DONE]\n\n")
        assert [e["choices"][0]["delta"] for e in events] == [{"role": "assistant", "content": ""},
                                                              {"content": "Hel"}, {"content": "lo"}]
        assert {e["id"] for e in events} == {"a"} and {e["created"] for e in events} == {7}
        cont = Router.bodies[1]
        assert cont["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
        assert cont["continue_final_message"] is True and cont["add_generation_prompt"] is False
        assert cont["max_completion_tokens"] == 7

    asyncio.run(run(behaviour, client))


def test_the_limit_ends_a_stream_that_keeps_failing_with_the_error_event() -> None:
    def behaviour(router: FakeRouter, t: Any, path: bytes, n: int) -> None:
        t.write(HEAD + text_chunk("a"))
        t.close()

    async def client(c: httpx.AsyncClient) -> None:
        async with c.stream("POST", "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as r:
            text = (await r.aread()).decode()
        assert '"code":"stream_interrupted"' in text and text.endswith("data: [DONE]\n\n")
        assert "".join(e["choices"][0]["text"] for e in sse(text) if "choices" in e) == "aa"  # each once
        assert len(Router.bodies) == 2  # the first and one continuation

    asyncio.run(run(behaviour, client, migration={"limit": 1, "retry_s": 0.05}))


def test_a_stream_cut_before_its_first_event_is_sent_again_whole() -> None:
    def behaviour(router: FakeRouter, t: Any, path: bytes, n: int) -> None:
        if len(Router.bodies) == 1:
            t.write(HEAD)
            t.close()
        else:
            t.write(HEAD + text_chunk("ok", finish="stop") + event("[DONE]") + b"0\r\n\r\n")

    async def client(c: httpx.AsyncClient) -> None:
        body = {"model": "m", "prompt": "x", "stream": True, "n": 2}  # not continuable, but nothing was sent
        async with c.stream("POST", "/v1/completions", json=body) as r:
            text = (await r.aread()).decode()
        assert "error" not in text and [e["choices"][0]["text"] for e in sse(text)] == ["ok"]
        assert Router.bodies[0] == Router.bodies[1]

    asyncio.run(run(behaviour, client))


def test_a_stream_that_cannot_be_continued_ends_with_the_error_event() -> None:
    def behaviour(router: FakeRouter, t: Any, path: bytes, n: int) -> None:
        t.write(HEAD + text_chunk("a"))
        t.close()

    async def client(c: httpx.AsyncClient) -> None:
        body = {"model": "m", "prompt": "x", "stream": True, "n": 2}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            text = (await r.aread()).decode()
        assert '"code":"stream_interrupted"' in text and len(Router.bodies) == 1

    asyncio.run(run(behaviour, client))


@pytest.mark.parametrize("failure", [b"Request failed: connection refused", b"Failed to get response body: eof"])
def test_a_non_streamed_request_the_routers_retries_failed_is_sent_again(failure: bytes) -> None:
    def behaviour(router: FakeRouter, t: Any, path: bytes, n: int) -> None:
        if len(Router.bodies) == 1:
            t.write(b"HTTP/1.1 500 X\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%b" % (len(failure), failure))
        else:
            body = b'{"choices": [{"text": "ok"}]}'
            t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                    % (len(body), body))

    async def client(c: httpx.AsyncClient) -> None:
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"
        assert len(Router.bodies) == 2

    asyncio.run(run(behaviour, client))


def test_a_client_error_is_not_sent_again() -> None:
    def behaviour(router: FakeRouter, t: Any, path: bytes, n: int) -> None:
        text = b"Request failed: bad"
        t.write(b"HTTP/1.1 400 X\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%b" % (len(text), text))

    async def client(c: httpx.AsyncClient) -> None:
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 400 and len(Router.bodies) == 1

    asyncio.run(run(behaviour, client))


def test_what_can_be_continued() -> None:
    assert continuable(False, {"prompt": "x"})
    assert not continuable(False, {"prompt": [1, 2]})
    assert not continuable(False, {"prompt": "x", "suffix": "y"})  # a fill: the text is not the prefix's
    assert not continuable(False, {"prompt": "x", "logprobs": 1})
    assert not continuable(True, {"messages": [], "n": 2})
    assert not continuable(True, {"messages": [], "response_format": {"type": "json_object"}})
    assert continuable(True, {"messages": [], "response_format": {"type": "text"}})


def test_a_transcript_past_its_cap_is_not_continued() -> None:
    import codefleet.gateway.migrate as migrate

    t = Transcript(False, {"prompt": "x"}, True)
    t.record(b"x" * (migrate.MAX_TRANSCRIPT + 1))
    assert not t.can_continue and t.events == [] and t.sent_any


def ids_chunk(text: str, first: bool = False, rid: str = "cmpl-1", finish: str | None = None) -> bytes:
    choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish, "token_ids": [ord(c) for c in text]}
    if first:
        choice["prompt_token_ids"] = [1, 2]
    return event({"id": rid, "object": "text_completion", "created": 5, "model": "m", "choices": [choice]})


@pytest.mark.parametrize("held_back", [False, True])
def test_a_continuation_is_sent_as_the_engines_token_ids_when_they_decode_to_the_text_sent(held_back: bool) -> None:
    def behaviour(router: FakeRouter, t: Any, path: bytes, n: int) -> None:
        if len(Router.bodies) == 1:
            # held_back: the engine has generated "c" but not sent its text yet (a stop string's start)
            last = event({"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m",
                          "choices": [{"index": 0, "text": "", "finish_reason": None, "token_ids": [99]}]})
            t.write(HEAD + ids_chunk("a", first=True) + ids_chunk("b") + (last if held_back else b""))
            t.close()
        else:
            t.write(HEAD + ids_chunk("cd", first=True, rid="cmpl-2", finish="length") + event("[DONE]") + b"0\r\n\r\n")

    async def client(c: httpx.AsyncClient) -> None:
        body = {"model": "m", "prompt": "x", "stream": True, "max_tokens": 6}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            text = (await r.aread()).decode()
        assert "token_ids" not in text and "error" not in text  # the client did not ask for them
        assert "".join(e["choices"][0]["text"] for e in sse(text)) == "abcd"
        first, cont = Router.bodies
        assert first["return_token_ids"] is True
        if held_back:  # the ids run ahead of the text: continued from the text, re-tokenized
            assert cont["prompt"] == "xab" and cont["max_tokens"] == 4
        else:  # exactly the engine's state: its prompt ids and the generated ids
            assert cont["prompt"] == [1, 2, 97, 98] and cont["max_tokens"] == 4

    gws: list[Any] = []
    asyncio.run(run(behaviour, client, seen=gws))
    samples = {(s.labels["outcome"], s.labels["how"]): s.value for m in gws[0].metrics.registry.collect()
               if m.name == "codefleet_gateway_migrations" for s in m.samples}
    assert samples == {("continued", "text" if held_back else "ids"): 1.0}


def test_a_chat_continuation_by_ids_uses_vllms_prompt_token_ids_and_a_client_that_asked_keeps_its_ids() -> None:
    def chat(delta: dict[str, Any], ids: list[int], top: dict[str, Any] | None = None) -> bytes:
        return event({"id": "a", "object": "chat.completion.chunk", "created": 7, "model": "m",
                      "choices": [{"index": 0, "delta": delta, "finish_reason": None, "token_ids": ids}], **(top or {})})

    def behaviour(router: FakeRouter, t: Any, path: bytes, n: int) -> None:
        if len(Router.bodies) == 1:
            t.write(HEAD + chat({"role": "assistant", "content": ""}, [], {"prompt_token_ids": [1, 2]})
                    + chat({"content": "Hi"}, [72, 105]))
            t.close()
        else:
            t.write(HEAD + chat({"role": "assistant", "content": ""}, [], {"prompt_token_ids": [1, 2, 72, 105]})
                    + chat({"content": "!"}, [33]) + event("[DONE]") + b"0\r\n\r\n")

    async def client(c: httpx.AsyncClient) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "return_token_ids": True}
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            text = (await r.aread()).decode()
        events = sse(text)
        assert [e["choices"][0]["token_ids"] for e in events] == [[], [72, 105], [33]]
        assert [e.get("prompt_token_ids") for e in events] == [[1, 2], None, None]  # the client's prompt only
        cont = Router.bodies[1]
        assert cont["kv_transfer_params"] == {"prompt_token_ids": [1, 2, 72, 105]}
        assert cont["messages"] == body["messages"]  # still validated by vLLM, not rendered

    asyncio.run(run(behaviour, client))


def test_a_cut_in_the_middle_of_an_event_sends_none_of_it_and_the_continuation_whole() -> None:
    def behaviour(router: FakeRouter, t: Any, path: bytes, n: int) -> None:
        if len(Router.bodies) == 1:
            half = text_chunk("b")[: len(text_chunk("b")) // 2 + 8]
            t.write(HEAD + text_chunk("a") + half)  # the replica died inside an event
            t.close()
        else:
            t.write(HEAD + text_chunk("bc", "cmpl-2", 9, "length") + event("[DONE]") + b"0\r\n\r\n")

    async def client(c: httpx.AsyncClient) -> None:
        async with c.stream("POST", "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as r:
            text = (await r.aread()).decode()
        events = sse(text)  # every event parses: no half of the lost one glued to the next
        assert "".join(e["choices"][0]["text"] for e in events) == "abc" and {e["id"] for e in events} == {"cmpl-1"}
        assert Router.bodies[1]["prompt"] == "xa"

    asyncio.run(run(behaviour, client))


def test_a_requests_own_in_band_error_passes_through_and_is_not_sent_again() -> None:
    def behaviour(router: FakeRouter, t: Any, path: bytes, n: int) -> None:
        t.write(HEAD + text_chunk("a") + event({"error": {"message": "bad request: grammar", "type": "BadRequestError",
                                                          "code": 400}}) + event("[DONE]") + b"0\r\n\r\n")

    async def client(c: httpx.AsyncClient) -> None:
        async with c.stream("POST", "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as r:
            text = (await r.aread()).decode()
        assert "bad request: grammar" in text and text.endswith("data: [DONE]\n\n") and len(Router.bodies) == 1

    asyncio.run(run(behaviour, client))


def test_a_continuation_refused_with_a_4xx_ends_the_stream_with_its_message_at_once() -> None:
    def behaviour(router: FakeRouter, t: Any, path: bytes, n: int) -> None:
        if len(Router.bodies) == 1:
            t.write(HEAD + text_chunk("a"))
            t.close()
        else:
            msg = b'{"error": {"message": "This model\'s maximum context length is 2048 tokens", "code": 400}}'
            t.write(b"HTTP/1.1 400 X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(msg), msg))

    async def client(c: httpx.AsyncClient) -> None:
        async with c.stream("POST", "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as r:
            text = (await r.aread()).decode()
        assert "maximum context length" in text and '"code":"stream_interrupted"' in text
        assert len(Router.bodies) == 2  # not sent again and again until the timeout

    asyncio.run(run(behaviour, client))


def test_a_stream_cut_after_its_last_token_ends_with_length_not_one_token_more() -> None:
    def behaviour(router: FakeRouter, t: Any, path: bytes, n: int) -> None:
        t.write(HEAD + ids_chunk("a", first=True) + ids_chunk("b"))  # max_tokens 2: both generated
        t.close()

    async def client(c: httpx.AsyncClient) -> None:
        body = {"model": "m", "prompt": "x", "stream": True, "max_tokens": 2}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            text = (await r.aread()).decode()
        events = sse(text)
        assert "".join(e["choices"][0]["text"] for e in events) == "ab" and "error" not in text
        assert events[-1]["choices"][0]["finish_reason"] == "length" and events[-1]["id"] == "cmpl-1"
        assert len(Router.bodies) == 1

    asyncio.run(run(behaviour, client))


def test_fields_that_read_the_prompt_differently_are_not_continued() -> None:
    assert not continuable(False, {"prompt": "x", "truncate_prompt_tokens": 100})
    assert not continuable(True, {"messages": [], "prompt_logprobs": 1})
    t = Transcript(True, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, True)
    assert not t.ids_usable()  # vLLM ignores prompt ids for messages with parts: continued from text


def test_all_transcripts_share_one_budget_and_give_it_back_when_they_end() -> None:
    from codefleet.gateway.migrate import Budget

    budget = Budget(limit=100)
    a, b = Transcript(False, {"prompt": "x"}, True, budget), Transcript(False, {"prompt": "y"}, True, budget)
    a.record(b"x" * 60)
    b.record(b"y" * 60)  # over the budget: b is no longer kept (its stream is not continued)
    assert a.can_continue and not b.can_continue and budget.used == 60
    a.release()
    assert budget.used == 0
