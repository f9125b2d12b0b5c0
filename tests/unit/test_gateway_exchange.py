"""The gateway's request state machine in-process: a Gateway and its protocol on one event loop,
with a misbehaving router written here (no processes), driven by httpx."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
import httpx
import pytest

from codefleet.gateway.config import GatewayConfig
from codefleet.gateway.http import Client
from codefleet.gateway.server import Gateway

Behaviour = Callable[["FakeRouter", asyncio.Transport, bytes, int], None]
OK = b'{"choices": [{"text": "ok"}]}'


class FakeRouter(asyncio.Protocol):
    """Answers ``/workers``; every other request goes to ``behaviour(router, transport, path, n)``
    where n counts the requests seen on this connection."""

    connections = 0
    reused = 0
    port = 0
    """The port it listens on (set by with_gateway)."""
    """Requests that came on a connection that had carried one before (the pool at work)."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.n = 0
        self.headers: list[tuple[bytes, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        FakeRouter.connections += 1

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_message_complete(self) -> None:
        assert self.transport is not None
        if self.url == b"/workers":
            body = json.dumps({"workers": [{"model_id": "m", "is_healthy": True}]}).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            return
        self.n += 1
        FakeRouter.reused += self.n > 1
        self.behaviour(self, self.transport, self.url, self.n)


def answer(t: asyncio.Transport, body: bytes = OK) -> None:
    t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))


async def with_gateway(behaviour: Behaviour, client: Callable[[httpx.AsyncClient], Awaitable[None]],
                       seen: list[Gateway] | None = None, fake: type[FakeRouter] = FakeRouter,
                       **config: Any) -> None:
    loop = asyncio.get_running_loop()
    FakeRouter.connections = FakeRouter.reused = 0
    router = await loop.create_server(lambda: fake(behaviour), "127.0.0.1", 0)
    rport = fake.port = router.sockets[0].getsockname()[1]
    gw = Gateway(GatewayConfig(router_url=f"http://127.0.0.1:{rport}", **{"models": ("m",), "port": 0, **config}))
    if seen is not None:
        seen.append(gw)
    await gw.open()
    server = await loop.create_server(lambda: Client(gw), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
            await client(c)
    finally:
        server.close()
        await gw.close()
        router.close()


BODY = {"model": "m", "prompt": "x"}


def test_stale_keepalive_connection_is_retried_once() -> None:
    def behaviour(router: FakeRouter, t: asyncio.Transport, path: bytes, n: int) -> None:
        if n == 1:
            answer(t)
        else:
            t.close()  # the router dropped the kept-alive connection just as the next request came

    async def client(c: httpx.AsyncClient) -> None:
        for _ in range(3):
            r = await c.post("/v1/completions", json=BODY)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"

    asyncio.run(with_gateway(behaviour, client))
    # the 2nd and 3rd went on the kept-alive connection (which the router closed), then once more
    # on a new one each: without the pool nothing is reused; without the retry they would be 502s
    assert FakeRouter.reused == 2
    assert FakeRouter.connections >= 4  # /workers, the first, then a new one for each stale one


def test_fresh_connection_dropped_before_an_answer_is_a_502() -> None:
    def behaviour(router: FakeRouter, t: asyncio.Transport, path: bytes, n: int) -> None:
        t.close()

    async def client(c: httpx.AsyncClient) -> None:
        r = await c.post("/v1/completions", json=BODY)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
        # the connection to the client stays usable
        assert (await c.get("/health")).status_code == 200

    asyncio.run(with_gateway(behaviour, client))


def test_router_answer_cut_mid_body_is_a_502() -> None:
    def behaviour(router: FakeRouter, t: asyncio.Transport, path: bytes, n: int) -> None:
        t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"choices\": [")
        t.close()

    async def client(c: httpx.AsyncClient) -> None:
        r = await c.post("/v1/completions", json=BODY)
        assert r.status_code == 502 and "was cut" in r.json()["error"]["message"]

    asyncio.run(with_gateway(behaviour, client))


def test_router_stream_cut_ends_with_an_error_event_when_migration_is_off() -> None:
    def behaviour(router: FakeRouter, t: asyncio.Transport, path: bytes, n: int) -> None:
        event = b'data: {"choices": [{"text": "a"}]}\n\n'
        t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n%b\r\n" % (len(event), event))
        t.close()

    async def client(c: httpx.AsyncClient) -> None:
        async with c.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as r:
            text = (await r.aread()).decode()
        assert r.status_code == 200
        assert text.startswith('data: {"choices"') and '"code":"stream_interrupted"' in text
        assert text.endswith("data: [DONE]\n\n")

    asyncio.run(with_gateway(behaviour, client, migration={"limit": 0}))


@pytest.mark.parametrize("status", [400, 503])
def test_router_plain_text_errors_become_openai_errors(status: int) -> None:
    def behaviour(router: FakeRouter, t: asyncio.Transport, path: bytes, n: int) -> None:
        text = b"No available workers" if status == 503 else b"bad thing"
        t.write(b"HTTP/1.1 %d X\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%b" % (status, len(text), text))

    async def client(c: httpx.AsyncClient) -> None:
        r = await c.post("/v1/completions", json=BODY)
        assert r.status_code == status and "error" in r.json()
        if status == 503:
            assert r.headers["retry-after"] == "5" and r.json()["error"]["code"] == "model_unavailable"

    asyncio.run(with_gateway(behaviour, client))


def test_prefix_affinity_sends_its_key_replaces_the_clients_and_frees_it_at_the_end() -> None:
    sent: list[list[tuple[bytes, bytes]]] = []

    def behaviour(router: FakeRouter, t: asyncio.Transport, path: bytes, n: int) -> None:
        sent.append(router.headers)
        answer(t)

    gateways: list[Gateway] = []
    file_a = "def f(x):\n    return x\n" * 60  # about 1.4 KB: 5 chunks

    async def client(c: httpx.AsyncClient) -> None:
        for q in ("explain f", "test f"):
            r = await c.post("/v1/completions", json={"model": "m", "prompt": file_a + q},
                             headers={"X-Session-Id": "chosen-by-the-client"})
            assert r.status_code == 200
        for _ in range(3):
            assert (await c.post("/v1/completions", json={"model": "m", "prompt": "x"})).status_code == 200

    asyncio.run(with_gateway(behaviour, client, gateways,
                             affinity={"chunk_chars": 256, "min_share": 0.5, "spill": 1.25, "index_chunks": 1000}))
    keys = [[v for k, v in h if k == b"x-session-id"] for h in sent]
    assert all(len(k) == 1 for k in keys), keys  # exactly one: ours, the client's is dropped
    assert keys[0] == keys[1] and keys[0] != [b"chosen-by-the-client"]
    assert len({k[0] for k in keys[2:]}) == 3 and all(b".~spread~" in k[0] for k in keys[2:])
    gw = gateways[0]
    assert gw.affinity is not None and not gw.affinity.in_flight  # every request's key was released
    assert not gw.active  # and every exchange left the in-flight set when it ended


def test_a_suffix_for_a_model_that_does_not_fill_is_a_400_naming_those_that_do() -> None:
    sent: list[bytes] = []

    def behaviour(router: FakeRouter, t: asyncio.Transport, path: bytes, n: int) -> None:
        sent.append(path)
        answer(t)

    async def client(c: httpx.AsyncClient) -> None:
        r = await c.post("/v1/completions", json={"model": "plain", "prompt": "def f(", "suffix": "):\n"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "suffix" and err["code"] == "fim_not_supported"
        assert "`plain` does not fill in the middle" in err["message"] and "Models that do: m." in err["message"]
        # a null suffix is no suffix (Tabby sends one), and chat is not a fill
        assert (await c.post("/v1/completions", json={"model": "m", "prompt": "x", "suffix": None})).status_code == 200
        models = (await c.get("/v1/models")).json()["data"]
        assert [(m["id"], m["fim"]) for m in models] == [("m", "starcoder"), ("plain", None)]

    async def fleet(c: httpx.AsyncClient) -> None:
        await client(c)
        # vLLM copies the suffix into every prompt of a list before any check: held to the body limit
        r = await c.post("/v1/completions", json={"model": "m", "prompt": [""] * 40, "suffix": "x" * 2000})
        assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
        assert "more than the 65536-byte request limit" in r.json()["error"]["message"]
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "x", "suffix": ["a"]})
        assert r.status_code == 400 and "`suffix` must be a string" in r.json()["error"]["message"]
        ok = await c.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"], "suffix": "x" * 2000})
        assert ok.status_code == 200

    asyncio.run(with_gateway(behaviour, fleet, models=("m", "plain"), fim={"m": "starcoder"},
                             max_body_bytes=65536))
    assert sent == [b"/v1/completions"] * 2  # only the acceptable requests reached the router


def test_a_reload_brings_new_fill_formats(tmp_path: Any) -> None:
    from codefleet.gateway.config import GatewayConfig

    gateways: list[Gateway] = []

    async def client(c: httpx.AsyncClient) -> None:
        assert (await c.get("/v1/models")).json()["data"][0]["fim"] is None
        cfg = tmp_path / "gw.json"
        cfg.write_text(GatewayConfig(router_url="http://127.0.0.1:1", models=("m",), fim={"m": "starcoder"}).to_json())
        gateways[0].reload(str(cfg))
        assert (await c.get("/v1/models")).json()["data"][0]["fim"] == "starcoder"

    asyncio.run(with_gateway(lambda r, t, p, n: answer(t), client, gateways))
