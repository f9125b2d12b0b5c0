"""The fleet's one OpenAI endpoint: a thin gate in front of vllm-router.

vllm-router (Rust, vLLM project) does the routing: per-model worker sets in IGW mode, the
load- and prefix-aware policy, retries and circuit breakers. It falls short of an OpenAI
endpoint in a few places, measured on vllm-router 0.1.17:

* ``GET /v1/models`` answers ``{"models": [...]}``, not OpenAI's list shape;
  ``GET /v1/models/{id}`` answers 405;
* a request for an unknown model is forwarded to *some* worker (a 200 from another model);
* a request without ``model`` gets 503 "No available workers" (a 5xx for a client mistake);
* errors are plain text, not OpenAI's ``{"error": {...}}``;
* clients are not authenticated (``--api-key`` is what the router sends to workers).

This gate closes exactly those gaps and nothing else: it checks the key, the body size and the
``model`` field, answers ``/v1/models`` itself, and streams everything else to the router
byte for byte over pooled keep-alive connections. Its added latency is measured by
``benchmarks/router_overhead.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from aiohttp.client_exceptions import ClientError
from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Paths the gate forwards to the router (POST, JSON body with a ``model``).
FORWARDED = ("/v1/chat/completions", "/v1/completions")

#: Environment variable carrying the key the gate presents to the engines (never on argv).
UPSTREAM_KEY_ENV = "CODEFLEET_UPSTREAM_KEY"

disable_created_metrics()

_SSE_DONE = b"data: [DONE]\n\n"

_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "authorization", "content-type",
})
_RESPONSE_DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"})


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gate needs; written by the launcher (or rendered by the Helm chart) as JSON."""

    router_url: str
    models: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    key_sha256: tuple[str, ...] = ()
    """Hex SHA-256 of each accepted client key; empty means no authentication."""
    max_body_bytes: int = 32 * 1024 * 1024
    poll_s: float = 0.5
    """How often the gate reads the router's worker list."""
    created: int = field(default_factory=lambda: int(time.time()))

    def to_json(self) -> str:
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}, indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> GatewayConfig:
        data = json.loads(Path(path).read_text())
        data["models"] = tuple(data["models"])
        data["key_sha256"] = tuple(data.get("key_sha256", ()))
        return cls(**data)


def hash_keys(keys: Iterable[str]) -> tuple[str, ...]:
    return tuple(hashlib.sha256(k.encode()).hexdigest() for k in keys)


def openai_error(status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


class Gateway:
    """The aiohttp application; one instance per process."""

    def __init__(self, config: GatewayConfig, upstream_key: str | None = None) -> None:
        self.config = config
        self.models = frozenset(config.models)
        self._key_digests = tuple(bytes.fromhex(h) for h in config.key_sha256)
        self._upstream_auth = f"Bearer {upstream_key}" if upstream_key else None
        self._session: ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None
        #: Models with at least one healthy worker in the router, refreshed every ``poll_s``.
        #: vllm-router sends a request for a model without workers to *another* model's worker,
        #: so the gate answers 503 itself for those.
        self.available: frozenset[str] = self.models
        self._refreshed_at = 0.0
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "codefleet_gateway_requests", "Requests answered by the gateway, by model and HTTP status",
            ["model", "status"], registry=self.registry,
        )
        self.rejected = Counter(
            "codefleet_gateway_rejected", "Requests the gateway answered itself without reaching the router",
            ["reason"], registry=self.registry,
        )
        self._models_body = orjson.dumps({
            "object": "list",
            "data": [self._model_object(m) for m in config.models],
        })

    def _model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.config.created, "owned_by": "codefleet"}

    # -- application -------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, handler_args={"max_field_size": 65536})
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.get_model)
        for path in FORWARDED:
            app.router.add_post(path, self.forward)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    def metrics_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        return app

    async def _open(self, _: web.Application) -> None:
        connector = TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=None)
        self._session = ClientSession(
            connector=connector, auto_decompress=False, timeout=ClientTimeout(total=None, sock_connect=10),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

        await self.refresh_workers()
        self._poller = asyncio.create_task(self._poll_workers())

    async def refresh_workers(self) -> None:
        assert self._session is not None
        self._refreshed_at = time.monotonic()
        try:
            async with self._session.get(self.config.router_url + "/workers") as r:
                data = await r.json(content_type=None)
            self.available = frozenset(w["model_id"] for w in data.get("workers", []) if w.get("is_healthy", True))
        except (ClientError, TimeoutError, ValueError, KeyError):
            pass  # router restarting: keep the last known set

    async def _poll_workers(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_s)
            await self.refresh_workers()

    async def _close(self, _: web.Application) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._session is not None:
            await self._session.close()

    # -- checks ------------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        if not self._key_digests:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        digest = hashlib.sha256(token.strip().encode()).digest()
        ok = False
        for known in self._key_digests:  # no early exit: same time for every key
            ok |= hmac.compare_digest(digest, known)
        return ok

    def _unauthorized(self) -> web.Response:
        self.rejected.labels("unauthorized").inc()
        return openai_error(
            401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
        )

    # -- handlers ----------------------------------------------------------------------------

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        return web.Response(body=self._models_body, content_type="application/json")

    async def get_model(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        name = request.match_info["model"]
        if name not in self.models:
            return self._unknown_model(name)
        return web.Response(body=orjson.dumps(self._model_object(name)), content_type="application/json")

    async def not_found(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        self.rejected.labels("unknown_path").inc()
        if request.path in FORWARDED or request.path.startswith("/v1/models"):
            return openai_error(405, f"Method {request.method} is not allowed on {request.path}.",
                                code="method_not_allowed", headers={"Allow": "GET" if "models" in request.path else "POST"})
        return openai_error(404, f"Unknown path {request.path}. This endpoint serves "
                                 f"{', '.join(FORWARDED)} and /v1/models.", code="unknown_url")

    def _unknown_model(self, name: str) -> web.Response:
        self.rejected.labels("unknown_model").inc()
        return openai_error(
            404, f"The model `{name}` does not exist. Served models: {', '.join(sorted(self.models))}.",
            param="model", code="model_not_found",
        )

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._unauthorized()
        length = request.content_length
        if length is not None and length > self.config.max_body_bytes:
            return self._too_large()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            self.rejected.labels("invalid_json").inc()
            return openai_error(400, f"The request body is not valid JSON: {exc}.", code="invalid_json")
        if not isinstance(payload, dict):
            self.rejected.labels("invalid_json").inc()
            return openai_error(400, f"The request body must be a JSON object, not {type(payload).__name__}.",
                                code="invalid_json")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            self.rejected.labels("missing_model").inc()
            return openai_error(400, "The request needs a `model` (a string); GET /v1/models lists them.",
                                param="model", code="missing_model")
        if model not in self.models:
            return self._unknown_model(model)
        if model not in self.available:
            if time.monotonic() - self._refreshed_at > 0.1:  # a replica may have just been registered
                await self.refresh_workers()
            if model not in self.available:
                return self._no_replica(model)
        return await self._proxy(request, body, model, stream=bool(payload.get("stream")))

    def _too_large(self) -> web.Response:
        self.rejected.labels("too_large").inc()
        return openai_error(413, f"The request body is larger than {self.config.max_body_bytes} bytes.",
                            code="request_too_large")

    async def _proxy(self, request: web.Request, body: bytes, model: str, stream: bool) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Content-Type"] = "application/json"  # parsed above; vllm-router insists on it
        if self._upstream_auth:
            headers["Authorization"] = self._upstream_auth
        resp: web.StreamResponse | None = None
        try:
            async with self._session.post(self.config.router_url + request.path, data=body, headers=headers) as up:
                if up.status >= 400 and not up.content_type.endswith("json"):
                    text = (await up.read()).decode(errors="replace").strip()
                    return self._upstream_error(model, up.status, text)
                out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _RESPONSE_DROP}
                self.requests.labels(model, str(up.status)).inc()
                if not stream or up.status >= 400:
                    return web.Response(status=up.status, body=await up.read(), headers=out_headers)
                resp = web.StreamResponse(status=up.status, headers=out_headers)
                await resp.prepare(request)
                tail = b""
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                    tail = (tail + chunk)[-16:]
                if not tail.endswith(_SSE_DONE):
                    await self._stream_error(resp, model, "the replica's stream ended early")
                await resp.write_eof()
                return resp
        except (TimeoutError, ClientError) as exc:
            if resp is not None:
                # Mid-stream (the replica died): the status line is gone, so end the stream with an
                # error event, which the OpenAI SDK raises as APIError.
                try:
                    await self._stream_error(resp, model, f"the replica failed mid-stream ({type(exc).__name__})")
                    await resp.write_eof()
                except (ConnectionError, ClientError):
                    pass  # the client is gone too
                return resp
            self.requests.labels(model, "502").inc()
            return openai_error(502, f"The router did not answer for model `{model}`: {exc or type(exc).__name__}.",
                                type_="server_error", code="upstream_unavailable")

    def _no_replica(self, model: str) -> web.Response:
        self.requests.labels(model, "503").inc()
        return openai_error(503, f"Model `{model}` has no ready replica right now; retry shortly.",
                            type_="server_error", code="model_unavailable", headers={"Retry-After": "5"})

    async def _stream_error(self, resp: web.StreamResponse, model: str, why: str) -> None:
        self.requests.labels(model, "stream_aborted").inc()
        err = {"error": {"message": f"Generation for model `{model}` was interrupted: {why}; retry the request.",
                         "type": "server_error", "param": None, "code": "stream_interrupted"}}
        await resp.write(b"data: " + orjson.dumps(err) + b"\n\n" + _SSE_DONE)

    def _upstream_error(self, model: str, status: int, text: str) -> web.Response:
        """Wrap the router's plain-text errors in OpenAI's shape, keeping the status."""
        self.requests.labels(model, str(status)).inc()
        if status == 503 and "No available workers" in text:
            return self._no_replica(model)
        type_ = "invalid_request_error" if status < 500 else "server_error"
        return openai_error(status, text or f"upstream status {status}", type_=type_)


async def serve(config: GatewayConfig, upstream_key: str | None = None) -> None:
    gw = Gateway(config, upstream_key)
    runner = web.AppRunner(gw.app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port, backlog=2048, reuse_address=True).start()
    metrics_runner = web.AppRunner(gw.metrics_app(), access_log=None)
    await metrics_runner.setup()
    await web.TCPSite(metrics_runner, config.metrics_host, config.metrics_port).start()
    print(f"codefleet gateway on http://{config.host}:{config.port} -> {config.router_url}; "
          f"metrics on http://{config.metrics_host}:{config.metrics_port}/metrics", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await metrics_runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="codefleet gateway", description="The fleet's OpenAI endpoint in front of vllm-router.")
    p.add_argument("--config", required=True, help="gateway JSON config (written by `codefleet up`)")
    args = p.parse_args(argv)
    config = GatewayConfig.from_file(args.config)
    import uvloop

    uvloop.run(serve(config, os.environ.get(UPSTREAM_KEY_ENV) or None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
