"""The gateway process: the policy wired to the HTTP protocol and the router pool, its metrics,
the router's worker list, and signals. ``python -m codefleet.gateway --config FILE``."""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import hashlib
import math
import os
import resource
import signal
import time
import urllib.parse
from typing import Any

import orjson
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from aiohttp.client_exceptions import ClientError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from codefleet.gateway.admission import Admission
from codefleet.gateway.config import DEFAULT_TENANT, FORWARDED, UPSTREAM_KEY_ENV, GatewayConfig
from codefleet.gateway.http import Client, Request
from codefleet.gateway.policy import Rejection, check_body, error_body, reject
from codefleet.gateway.upstream import Exchange, Pool
from codefleet.status import engine_look

disable_created_metrics()

_FORWARDED = frozenset(p.encode() for p in FORWARDED)
HOLD_POLL_S = 0.2
"""How often the router's worker list is read while requests are held."""
QUEUE_POLL_S = 1.0
"""How often the engines of a model with a queue limit (overload shedding) are read."""


def connection_cap(configured: int) -> int:
    """The configured cap, or fewer when the file limit could not hold two descriptors per
    connection (the client's and the router's) plus a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(16, min(configured, (soft - 64) // 2))


class Gateway:
    """The checks and answers of the gate; ``http.Client`` and ``upstream.Exchange`` move the bytes."""

    def __init__(self, config: GatewayConfig, upstream_key: str | None = None) -> None:
        self.config = config
        self.models = frozenset(config.models)
        self.digests = tuple(bytes.fromhex(h) for h in config.key_sha256)
        self.key_tenants = {bytes.fromhex(h): t for h, t in config.key_tenants.items()}
        self.admission = Admission(config.tenants, config.frontend_pods)
        self.upstream_auth = f"Bearer {upstream_key}".encode() if upstream_key else None
        url = urllib.parse.urlsplit(config.router_url)
        self.upstream_addr = (url.hostname or "127.0.0.1", url.port or 80)
        self.upstream_host = url.netloc.encode()
        self.pool = Pool(self.upstream_addr)
        self.max_connections = connection_cap(config.limits.max_connections)
        self.connections = 0
        self._session: ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None
        self._queue_watcher: asyncio.Task[None] | None = None
        self.worker_urls: list[tuple[str, str]] = []
        #: Shed models: their engines' waiting requests, and requests finished per second (EWMA).
        self.queue_depth: dict[str, float] = {}
        self.drain_rate: dict[str, float] = {}
        #: Models with at least one healthy worker in the router, refreshed every ``poll_s``.
        #: vllm-router sends a request for a model without workers to *another* model's worker,
        #: so the gate answers 503 itself for those.
        self.available: frozenset[str] = self.models
        self._refreshed_at = 0.0
        self._refreshing: asyncio.Future[None] | None = None
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "codefleet_gateway_requests", "Requests answered by the gateway, by model and HTTP status",
            ["model", "status"], registry=self.registry,
        )
        self.rejected = Counter(
            "codefleet_gateway_rejected", "Requests the gateway answered itself without reaching the router",
            ["reason"], registry=self.registry,
        )
        self._counted: dict[tuple[str, str], Any] = {}
        self._children: dict[tuple[Any, ...], Any] = {}
        # -- holding (scale from zero) --
        self.hold = config.hold
        self.held: dict[str, collections.deque[Exchange]] = {m: collections.deque() for m in config.hold}
        self.hold_began: dict[str, float] = {}
        """Per model: when its current wait for a replica began (the oldest held request's arrival)."""
        self.cold_start = {m: h.cold_start_s for m, h in config.hold.items()}
        """Per model: the Retry-After estimate of a wait, the last cold start seen (configured at first)."""
        self.held_gauge = Gauge("codefleet_gateway_held_requests",
                                "Requests held for a model with no ready replica (scale-from-zero demand)",
                                ["model"], registry=self.registry)
        self.hold_outcomes = Counter("codefleet_gateway_hold", "Held requests by outcome "
                                     "(released, timeout, overflow, gone, shutdown)", ["model", "outcome"],
                                     registry=self.registry)
        self.hold_seconds = Histogram("codefleet_gateway_hold_seconds", "How long released requests were held",
                                      ["model"], registry=self.registry,
                                      buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600))
        for m in config.hold:
            self.held_gauge.labels(m).set(0)
        # -- tenants (labels: tenant names and models from the configuration only) --
        self.tenant_requests = Counter("codefleet_tenant_requests", "Requests answered, by tenant, model and status",
                                       ["tenant", "model", "status"], registry=self.registry)
        self.tenant_prompt_tokens = Counter("codefleet_tenant_prompt_tokens", "Prompt tokens (each answer's usage)",
                                            ["tenant", "model"], registry=self.registry)
        self.tenant_completion_tokens = Counter("codefleet_tenant_completion_tokens",
                                                "Completion tokens (each answer's usage)", ["tenant", "model"],
                                                registry=self.registry)
        self.tenant_rejections = Counter("codefleet_tenant_rejections", "Requests refused by admission, by reason",
                                         ["tenant", "model", "reason"], registry=self.registry)
        #: Healthy workers per model in the router (None until the first look): ``ready_replicas`` in
        #: /v1/models, so a client (``codefleet smoke``) can tell a model scaled to zero.
        self.ready_replicas: dict[str, int] | None = None
        self._models_body = self._list_models()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Exchanges in flight (pruned as they finish); ``closing``: the process is stopping.
        self.active: set[Exchange] = set()
        self.closing = False

    def _model_object(self, name: str) -> dict[str, Any]:
        obj = {"id": name, "object": "model", "created": self.config.created, "owned_by": "codefleet"}
        if self.ready_replicas is not None:
            obj["ready_replicas"] = self.ready_replicas.get(name, 0)
        return obj

    def _list_models(self) -> bytes:
        return orjson.dumps({"object": "list", "data": [self._model_object(m) for m in self.config.models]})

    def count(self, model: str, status: str, tenant: str = "") -> None:
        child = self._counted.get((model, status))
        if child is None:
            child = self._counted[(model, status)] = self.requests.labels(model, status)
        child.inc()
        if tenant:
            self._child(self.tenant_requests, tenant, model, status).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        """A labelled child, looked up once (``labels()`` costs microseconds on every request)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def tenant_of(self, authorization: bytes | None) -> str:
        """The tenant of an accepted key (check_head has accepted it)."""
        _, _, token = (authorization or b"").partition(b" ")
        return self.key_tenants.get(hashlib.sha256(token.strip()).digest(), DEFAULT_TENANT)

    def settled(self, exchange: Exchange) -> None:
        """An admitted exchange has ended: free its slot, charge and count its tokens."""
        usage = exchange.usage or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.admission.finish(exchange.tenant, prompt + completion, time.monotonic() - exchange.admitted_at)
        if prompt:
            self._child(self.tenant_prompt_tokens, exchange.tenant, exchange.model).inc(prompt)
        if completion:
            self._child(self.tenant_completion_tokens, exchange.tenant, exchange.model).inc(completion)

    def reload(self, path: str) -> None:
        """SIGHUP: keys and tenants' limits from the config file again; a bad file changes nothing."""
        try:
            config = GatewayConfig.from_file(path)
            digests = tuple(bytes.fromhex(h) for h in config.key_sha256)
            key_tenants = {bytes.fromhex(h): t for h, t in config.key_tenants.items()}
            Admission(config.tenants, config.frontend_pods)  # validates before anything changes
        except (OSError, ValueError, TypeError, KeyError) as exc:
            print(f"codefleet gateway: reload of {path} refused, the running configuration stays: {exc}",
                  flush=True)
            return
        self.digests, self.key_tenants = digests, key_tenants
        self.admission.configure(config.tenants)
        print(f"codefleet gateway: reloaded {len(digests)} keys, {len(config.tenants)} tenants", flush=True)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def admit(self) -> bool:
        if self.connections >= self.max_connections:
            return False
        self.connections += 1
        return True

    def release(self) -> None:
        self.connections -= 1

    async def drain(self, budget: float) -> None:
        """Stopping: new requests get 503; the ones in flight may finish for ``budget`` seconds; a
        stream still open then ends with an OpenAI error event and ``[DONE]``, never a bare close."""
        self.stop_holding()
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline:
            self.active = {e for e in self.active if not e.finished and not e.client.closed}
            if not self.active:
                return
            await asyncio.sleep(0.1)
        for e in list(self.active):
            e.cut("the endpoint is shutting down")

    # -- holding -------------------------------------------------------------------------------

    def _hold(self, exchange: Exchange) -> None:
        """Keep ``exchange`` until its model has a ready replica, in arrival order, within the
        model's queue size and hold timeout; beyond either, 503 with a Retry-After."""
        model = exchange.model
        h, q = self.hold[model], self.held[model]
        while q and q[0].client.closed:  # left while waiting
            self._unhold(q.popleft(), "gone")
        if len(q) >= h.max_requests:
            self.hold_outcomes.labels(model, "overflow").inc()
            self._held_503(exchange, f"{len(q)} requests are already waiting for its first replica")
            return
        now = time.monotonic()
        if not q:
            self.hold_began.setdefault(model, now)
        exchange.held_at = now
        exchange.hold_timer = asyncio.get_running_loop().call_later(h.timeout_s, self._hold_expired, exchange)
        q.append(exchange)
        self.held_gauge.labels(model).set(len(q))
        self._recheck_soon()

    def _held_503(self, exchange: Exchange, why: str) -> None:
        exchange.finished = True
        self.count(exchange.model, "503", exchange.tenant)
        retry = self.retry_after(exchange.model)
        exchange.client.respond(503, error_body(f"Model `{exchange.model}` has no ready replica yet (one is "
                                                f"starting); {why}. Retry in {retry} s.",
                                                type_="server_error", code="model_starting"),
                                headers=((b"Retry-After", str(retry).encode()),))

    def retry_after(self, model: str) -> int:
        """Seconds until a replica is likely ready: the last cold start seen, less the time this wait
        has lasted; once past that estimate, a quarter of it. Within 1..60 (the OpenAI SDK honours
        Retry-After up to 60 s)."""
        est = self.cold_start.get(model, 60.0)
        began = self.hold_began.get(model)
        left = est - (time.monotonic() - began) if began is not None else est
        if left < 1:
            left = est / 4
        return max(1, min(60, math.ceil(left)))

    def _hold_expired(self, exchange: Exchange) -> None:
        q = self.held.get(exchange.model)
        if q is None or exchange not in q:
            return
        q.remove(exchange)
        self.held_gauge.labels(exchange.model).set(len(q))
        if exchange.client.closed:
            self._unhold(exchange, "gone")
            return
        self.hold_outcomes.labels(exchange.model, "timeout").inc()
        self._held_503(exchange, f"waited {self.hold[exchange.model].timeout_s:g} s (the hold timeout)")
        if not q:
            self.hold_began.pop(exchange.model, None)

    def _unhold(self, exchange: Exchange, outcome: str) -> None:
        if exchange.hold_timer is not None:
            exchange.hold_timer.cancel()
            exchange.hold_timer = None
        exchange.finished = exchange.finished or outcome == "gone"
        self.hold_outcomes.labels(exchange.model, outcome).inc()

    def release_held(self) -> None:
        """Start the held requests of every model that now has a replica, oldest first."""
        now = time.monotonic()
        for model, q in self.held.items():
            if not q or model not in self.available:
                continue
            began = self.hold_began.pop(model, None)
            if began is not None:
                self.cold_start[model] = max(1.0, now - began)
            while q:
                e = q.popleft()
                if e.client.closed:
                    self._unhold(e, "gone")
                    continue
                self._unhold(e, "released")
                self.hold_seconds.labels(model).observe(now - e.held_at)
                e.start()
            self.held_gauge.labels(model).set(0)

    def stop_holding(self) -> None:
        """The fleet is stopping (SIGUSR2, or this process): held requests and new ones get 503."""
        self.closing = True
        for model, q in self.held.items():
            while q:
                e = q.popleft()
                self._unhold(e, "shutdown")
                if not e.client.closed and not e.finished:
                    e.finished = True
                    self.count(model, "503", e.tenant)
                    e.client.respond(503, error_body("The endpoint is shutting down; retry shortly.",
                                                     type_="server_error", code="shutting_down"),
                                     headers=((b"Retry-After", b"5"),), keep_alive=False)
            self.held_gauge.labels(model).set(0)
        self.hold_began.clear()

    def _recheck_soon(self) -> None:
        """Look at the router's workers again now (a replica may have just been registered)."""
        if (self._refreshing is None or self._refreshing.done()) and time.monotonic() - self._refreshed_at > 0.1:
            self._refreshing = asyncio.ensure_future(self.refresh_workers())

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        self._session = ClientSession(connector=TCPConnector(limit=4), timeout=ClientTimeout(total=5))
        await self.refresh_workers()
        self._poller = asyncio.create_task(self._poll_workers())
        if self.config.shed:
            self._queue_watcher = asyncio.create_task(self._watch_queues())

    async def _watch_queues(self) -> None:
        """Every QUEUE_POLL_S: each shed model's engines' waiting requests (their own /metrics) and
        how fast they finish requests (the rate at which the queue drains)."""
        assert self._session is not None
        last: dict[str, tuple[float, float]] = {}  # model -> (time, finished requests)
        while True:
            await asyncio.sleep(QUEUE_POLL_S)
            waiting: dict[str, float] = {}
            done: dict[str, float] = {}
            for url, model in list(self.worker_urls):
                if model not in self.config.shed:
                    continue
                try:
                    async with self._session.get(url + "/metrics") as r:
                        text = await r.text()
                    look = engine_look(text)
                except (ClientError, TimeoutError, ValueError, KeyError):
                    continue  # an engine restarting or not answering: the others still count
                waiting[model] = waiting.get(model, 0.0) + (look.waiting or 0.0)
                done[model] = done.get(model, 0.0) + (look.finished or 0.0)
            now = time.monotonic()
            for model in self.config.shed:
                self.queue_depth[model] = waiting.get(model, 0.0)
                if model in done:
                    prev = last.get(model)
                    if prev is not None and now > prev[0] and done[model] >= prev[1]:
                        rate = (done[model] - prev[1]) / (now - prev[0])
                        old = self.drain_rate.get(model)
                        self.drain_rate[model] = rate if old is None else 0.7 * old + 0.3 * rate
                    last[model] = (now, done[model])

    def shed(self, model: str, tenant: str) -> Rejection | None:
        """429 when ``model``'s engines' queue is deeper than its limit, for a tenant holding at
        least its fair share of the requests in flight (those below it still get in: no tenant
        takes more than its share while others wait). Retry-After: the excess over the drain rate."""
        limit = self.config.shed.get(model)
        depth = self.queue_depth.get(model, 0.0)
        if limit is None or depth <= limit:
            return None
        if tenant and self.admission.enabled:
            active = {n: t.active for n, t in self.admission.tenants.items() if t.active}
            mine = active.get(tenant, 0)
            if active and mine < sum(active.values()) / len(active):
                return None
        rate = max(self.drain_rate.get(model, 0.0), 0.1)
        wait = min(60.0, max(1.0, (depth - limit + 1) / rate))
        return reject(429, f"Model `{model}` is overloaded: {depth:.0f} requests waiting in its engines (limit "
                           f"{limit}), draining at {rate:.1f}/s. Retry in {wait:.1f} s.", "model_overloaded",
                      "overloaded", headers=((b"retry-after-ms", str(math.ceil(wait * 1000)).encode()),
                                             (b"retry-after", str(math.ceil(wait)).encode())))

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._queue_watcher is not None:
            self._queue_watcher.cancel()
        if self._session is not None:
            await self._session.close()
        self.pool.close()

    async def refresh_workers(self) -> None:
        assert self._session is not None
        try:
            async with self._session.get(self.config.router_url + "/workers") as r:
                data = await r.json(content_type=None)
            workers = [w for w in data.get("workers", []) if w.get("is_healthy", True)]
            self.available = frozenset(w["model_id"] for w in workers)
            self.worker_urls = [(str(w["url"]), str(w["model_id"])) for w in workers if "url" in w]
            ready = collections.Counter(str(w["model_id"]) for w in workers)
            if ready != self.ready_replicas:
                self.ready_replicas = dict(ready)
                self._models_body = self._list_models()
        except (ClientError, TimeoutError, ValueError, KeyError, AttributeError):
            pass  # router restarting: keep the last known set
        self._refreshed_at = time.monotonic()
        self.release_held()

    async def _poll_workers(self) -> None:
        while True:
            # faster while requests wait for a replica (the launcher also signals a registration),
            # and until the router first answered (it may start after the gateway)
            holding = any(self.held.values()) or self.ready_replicas is None
            await asyncio.sleep(min(self.config.poll_s, HOLD_POLL_S) if holding else self.config.poll_s)
            await self.refresh_workers()

    def metrics_app(self) -> web.Application:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app

    # -- dispatch ------------------------------------------------------------------------------

    def answer(self, client: Client, rej: Rejection) -> None:
        self.rejected.labels(rej.reason).inc()
        client.respond(rej.status, rej.body, headers=rej.headers)

    def dispatch(self, client: Client, req: Request) -> None:
        """Answer ``req`` or start forwarding it (its key and size were checked with its head)."""
        path, method = req.path, req.method
        if path == b"/health":
            client.respond(200, b"ok", content_type=b"text/plain")
        elif path == b"/v1/models" or path.startswith(b"/v1/models/"):
            if method not in (b"GET", b"HEAD"):
                self._not_allowed(client, req, b"GET")
            elif path == b"/v1/models":
                client.respond(200, self._models_body)
            else:
                name = urllib.parse.unquote(path[len(b"/v1/models/"):].decode("latin-1"))
                if name in self.models:
                    client.respond(200, orjson.dumps(self._model_object(name)))
                else:
                    self.answer(client, self._unknown_model(name))
        elif path in _FORWARDED:
            if method != b"POST":
                self._not_allowed(client, req, b"POST")
            else:
                self.forward(client, req)
        else:
            self.answer(client, reject(404, f"Unknown path {path.decode('latin-1')}. This endpoint serves "
                                            f"{', '.join(FORWARDED)} and /v1/models.", "unknown_url", "unknown_path"))

    def _not_allowed(self, client: Client, req: Request, allow: bytes) -> None:
        self.answer(client, reject(405, f"Method {req.method.decode('latin-1')} is not allowed on "
                                        f"{req.path.decode('latin-1')}.", "method_not_allowed", "unknown_path",
                                   headers=((b"Allow", allow),)))

    def _unknown_model(self, name: str) -> Rejection:
        return reject(404, f"The model `{name}` does not exist. Served models: {', '.join(sorted(self.models))}.",
                      "model_not_found", "unknown_model", param="model")

    def router_has_none(self, exchange: Exchange) -> None:
        """The router had no worker for the exchange's model (it left since the last look): held
        like any request for a model without a replica, or 503."""
        self.available = self.available - {exchange.model}
        h = self.hold.get(exchange.model)
        if h is not None and h.max_requests > 0 and not self.closing and not exchange.client.closed:
            self._hold(exchange)
        else:
            exchange.finished = True
            self.no_replica(exchange.client, exchange.model)

    def no_replica(self, client: Client, model: str) -> None:
        self.count(model, "503")
        client.respond(503, error_body(f"Model `{model}` has no ready replica right now; retry shortly.",
                                       type_="server_error", code="model_unavailable"),
                       headers=((b"Retry-After", b"5"),))

    def forward(self, client: Client, req: Request) -> None:
        checked = check_body(req.path, req.body)
        if isinstance(checked, Rejection):
            self.answer(client, checked)
            return
        payload, model = checked
        if model not in self.models:
            self.answer(client, self._unknown_model(model))
            return
        if self.closing:
            self.count(model, "503")
            client.respond(503, error_body("The endpoint is shutting down; retry shortly.", type_="server_error",
                                           code="shutting_down"), headers=((b"Retry-After", b"5"),), keep_alive=False)
            return
        stream = payload.get("stream") is True
        tenant = req.tenant
        body = None
        if self.config.shed:
            rej = self.shed(model, tenant)
            if rej is not None:
                if tenant:
                    self.tenant_rejections.labels(tenant, model, rej.reason).inc()
                self.count(model, "429", tenant)
                self.answer(client, rej)
                return
        if tenant and self.admission.enabled:
            rej = self.admission.admit(tenant, model)
            if rej is not None:
                self.tenant_rejections.labels(tenant, model, rej.reason).inc()
                self.count(model, str(rej.status), tenant)
                self.answer(client, rej)
                return
            if stream:
                # the engine reports a stream's usage in a last chunk only when asked
                opts = payload.get("stream_options")
                if not (isinstance(opts, dict) and opts.get("include_usage") is True):
                    payload["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
                    body = orjson.dumps(payload)
        exchange = Exchange(self, client, req, model, stream=stream)
        if tenant and self.admission.enabled:
            exchange.admit(tenant, body)
        self.active.add(exchange)
        if model in self.available:
            exchange.start()
        elif self.hold.get(model) is not None and self.hold[model].max_requests > 0:
            self._hold(exchange)
        else:
            self.spawn(self._recheck(exchange))

    async def _recheck(self, exchange: Exchange) -> None:
        """A replica may have just been registered: look again before answering 503. Requests that
        arrive together share one look; one finished under 0.1 s ago counts as fresh."""
        if self._refreshing is None or self._refreshing.done():
            if time.monotonic() - self._refreshed_at > 0.1:
                self._refreshing = asyncio.ensure_future(self.refresh_workers())
        if self._refreshing is not None and not self._refreshing.done():
            await asyncio.shield(self._refreshing)
        if exchange.model in self.available:
            exchange.start()
        else:
            exchange.finished = True
            self.no_replica(exchange.client, exchange.model)


async def serve(config: GatewayConfig, upstream_key: str | None = None, config_path: str | None = None) -> None:
    gw = Gateway(config, upstream_key)
    await gw.open()
    # Everything allocated so far (modules, the app) lives as long as the process: keep it out of
    # the cyclic collector, so that a full collection scans only what requests leave behind
    # (full collections over the whole heap showed up as a 5-10 ms TTFT tail at p99).
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(gw), config.host, config.port, backlog=2048,
                                      reuse_address=True)
    metrics_runner = web.AppRunner(gw.metrics_app(), access_log=None, handle_signals=False)
    await metrics_runner.setup()
    await web.TCPSite(metrics_runner, config.metrics_host, config.metrics_port).start()
    print(f"codefleet gateway on http://{config.host}:{config.port} -> {config.router_url}; "
          f"metrics on http://{config.metrics_host}:{config.metrics_port}/metrics; "
          f"at most {gw.max_connections} connections", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: gw.spawn(gw.refresh_workers()))  # a replica joined or left
    loop.add_signal_handler(signal.SIGUSR2, gw.stop_holding)  # the fleet is stopping: hold nothing more
    if config_path:
        loop.add_signal_handler(signal.SIGHUP, gw.reload, config_path)  # new keys or tenants' limits
    await stop.wait()
    server.close()  # no new connections
    await gw.drain(config.drain_s)
    await gw.close()
    await metrics_runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="codefleet gateway", description="The fleet's OpenAI endpoint in front of vllm-router.")
    p.add_argument("--config", required=True, help="gateway JSON config (written by `codefleet up`)")
    args = p.parse_args(argv)
    config = GatewayConfig.from_file(args.config)
    import uvloop

    uvloop.run(serve(config, os.environ.get(UPSTREAM_KEY_ENV) or None, args.config))
    return 0
