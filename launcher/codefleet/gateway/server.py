"""The gateway process: the gate's checks wired to the HTTP protocol (``http.Client``) and the
router pool (``upstream.Exchange``), holding, shedding, tenants, the router's worker list, metrics
and signals. ``python -m codefleet.gateway --config FILE``.

A request's path: ``Client`` parses and checks its head (``check_head``), then ``dispatch``; a
forwarded one becomes an ``Exchange`` that is started, held (``hold.Holding``) or answered at once.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import resource
import time
import urllib.parse
from collections.abc import Coroutine
from typing import Any

import orjson
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from codefleet.gateway import answers
from codefleet.gateway.admission import Admission
from codefleet.gateway.affinity import Affinity
from codefleet.gateway.answers import Rejection
from codefleet.gateway.config import DEFAULT_TENANT, FORWARDED, GatewayConfig
from codefleet.gateway.hold import Holding
from codefleet.gateway.http import Client, Request
from codefleet.gateway.metrics import GatewayMetrics
from codefleet.gateway.migrate import Budget, Settings, Transcript, continuable, detokenized, tokens_moved
from codefleet.gateway.policy import FORWARDED_CHAT, FORWARDED_COMPLETIONS, check_body, check_fill
from codefleet.gateway.policy import check_head as check_key_and_size
from codefleet.gateway.pool import Pool
from codefleet.gateway.shed import Shedding
from codefleet.gateway.upstream import Exchange
from codefleet.gateway.workers import Workers

_FORWARDED = frozenset(p.encode() for p in FORWARDED)
_SERVED = ", ".join(FORWARDED)


def connection_cap(configured: int) -> int:
    """The configured cap, or fewer when the file limit could not hold two descriptors per
    connection (the client's and the router's) plus a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(16, min(configured, (soft - 64) // 2))


class Gateway:
    """The gate: ``http.Handler`` for client connections, ``upstream.Host`` for exchanges."""

    def __init__(self, config: GatewayConfig, upstream_key: str | None = None) -> None:
        self.config = config
        self.limits = config.limits
        self.max_body = config.max_body_bytes
        self.adapters = dict(config.adapters)  # LoRA adapter -> its base model (reloaded: ``apply``)
        self.models = frozenset(config.models) | frozenset(self.adapters)
        self.digests = tuple(bytes.fromhex(h) for h in config.key_sha256)
        self.key_tenants = {bytes.fromhex(h): t for h, t in config.key_tenants.items()}
        self.admission = Admission(config.tenants, config.frontend_pods)
        self.fim = dict(config.fim)
        """Per model that fills in the middle: its format (reloaded with the keys: ``codefleet apply``)."""
        self.migration = Settings(**config.migration)  # type: ignore[arg-type]
        self.transcripts = Budget()
        #: Engines that failed a migration's call lately (tried last), and the session for those calls
        #: (its own: a lost replica's streams all ask at once, and the worker list must not wait).
        self._failed_engines: dict[str, float] = {}
        self._engine_session: ClientSession | None = None
        self.upstream_auth = f"Bearer {upstream_key}".encode() if upstream_key else None
        url = urllib.parse.urlsplit(config.router_url)
        self.upstream_host = url.netloc.encode()
        self.pool = Pool((url.hostname or "127.0.0.1", url.port or 80))
        self.max_connections = connection_cap(config.limits.max_connections)
        self.connections = 0
        #: Connections with no request in progress, oldest first (closed at the cap to admit new ones).
        self.idle: dict[Client, None] = {}
        self.metrics = GatewayMetrics(config.hold)
        self.holding = Holding(config.hold, self.metrics, self._recheck_soon)
        self.shedding = Shedding(config.shed, self.admission)
        self.affinity = (Affinity(**config.affinity, count=self.metrics.affinity_outcome)  # type: ignore[arg-type]
                         if config.affinity is not None else None)
        self.workers = Workers(config.router_url, self.models, config.poll_s, self._workers_changed,
                               self.holding.any_held)
        self.workers.aliases = frozenset(self.adapters)
        self._models_body = self._list_models()
        self._session: ClientSession | None = None
        self._background: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Exchanges in flight (each leaves when it ends); ``closing``: the process is stopping.
        self.active: set[Exchange] = set()
        self.closing = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        self._session = ClientSession(connector=TCPConnector(limit=4), timeout=ClientTimeout(total=5))
        self.workers.session = self._session
        await self.workers.refresh()
        self._background.append(asyncio.create_task(self.workers.poll()))
        if self.config.shed:
            self._background.append(asyncio.create_task(self.shedding.watch(self._session, lambda: self.workers.urls)))

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        if self._session is not None:
            await self._session.close()
        if self._engine_session is not None:
            await self._engine_session.close()
        self.pool.close()

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

    def stop_holding(self) -> None:
        """The fleet is stopping (SIGUSR2, or this process): held requests and new ones get 503."""
        self.closing = True
        self.holding.stop()

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
        self.holding.configure(config.hold)  # an adapter added to a model that scales from zero is held too
        if config.fim != self.fim or config.adapters != self.adapters:
            self.fim, self.adapters = dict(config.fim), dict(config.adapters)
            self.workers.aliases = frozenset(self.adapters)
            self.models = frozenset(self.config.models) | self.workers.aliases
            self._models_body = self._list_models()
        print(f"codefleet gateway: reloaded {len(digests)} keys, {len(config.tenants)} tenants", flush=True)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def metrics_app(self) -> web.Application:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.metrics.registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app

    @property
    def ready_replicas(self) -> dict[str, int] | None:
        return self.workers.ready

    def _model_object(self, name: str) -> dict[str, Any]:
        parent = self.adapters.get(name)
        obj: dict[str, Any] = {"id": name, "object": "model", "created": self.config.created, "owned_by": "codefleet",
                               "fim": self.fim.get(parent or name), "parent": parent}
        if (ready := self.workers.ready) is not None:
            obj["ready_replicas"] = ready.get(name, 0)
        return obj

    def _list_models(self) -> bytes:
        return orjson.dumps({"object": "list", "data": [self._model_object(m) for m in self._served()]})

    def _served(self) -> list[str]:
        return [*self.config.models, *self.adapters]  # the models, then the adapters

    def _workers_changed(self) -> None:
        self._models_body = self._list_models()
        for model in self._served():
            self.metrics.child(self.metrics.ready, model).set((self.workers.ready or {}).get(model, 0))
        self.holding.release(self.workers.available)

    def _recheck_soon(self) -> None:
        """Look at the router's workers again now (a replica may have just been registered)."""
        self.workers.refresh_soon()

    async def refresh_workers(self) -> None:
        await self.workers.refresh()

    # -- http.Handler: connections -------------------------------------------------------------

    def opened(self, client: Client) -> bool:
        while self.connections >= self.max_connections:
            if not self.idle:
                return False
            victim = next(iter(self.idle))
            del self.idle[victim]
            if victim.admitted and not victim.closed:
                self.metrics.evicted.inc()
                victim.evict()  # frees its slot now (closed() below)
        self.connections += 1
        return True

    def closed(self, client: Client) -> None:
        self.connections -= 1
        self.idle.pop(client, None)

    def reusable(self, client: Client, idle: bool) -> None:
        if idle:
            if client.admitted and not client.closed:
                self.idle[client] = None
        else:
            self.idle.pop(client, None)

    def refused(self, reason: str) -> None:
        self.metrics.refused(reason)

    def check_head(self, req: Request, content_length: int | None) -> Rejection | None:
        rej = check_key_and_size(req.method, req.path, req.header(b"authorization"), content_length, self.digests,
                                 self.max_body)
        if rej is None and self.admission.enabled:
            req.tenant = self.tenant_of(req.header(b"authorization"))
        return rej

    def tenant_of(self, authorization: bytes | None) -> str:
        """The tenant of an accepted key (check_head has accepted it)."""
        _, _, token = (authorization or b"").partition(b" ")
        return self.key_tenants.get(hashlib.sha256(token.strip()).digest(), DEFAULT_TENANT)

    # -- upstream.Host: exchanges --------------------------------------------------------------

    def count(self, model: str, status: str, tenant: str = "") -> None:
        self.metrics.answered(model, status, tenant)

    def settled(self, exchange: Exchange) -> None:
        """An admitted exchange has ended: free its slot, charge and count its tokens."""
        usage = exchange.usage or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.admission.finish(exchange.tenant, prompt + completion, time.monotonic() - exchange.admitted_at)
        self.metrics.tokens(exchange.tenant, exchange.model, prompt, completion)

    def migrated(self, model: str, outcome: str, how: str = "") -> None:
        self.metrics.migrated(model, outcome, how)

    def _engines(self, model: str) -> tuple[ClientSession, list[str]]:
        """The session for migrations' engine calls, and the model's engines, the ones that failed
        a call lately last."""
        if self._engine_session is None:
            self._engine_session = ClientSession(connector=TCPConnector(limit=64),
                                                 timeout=ClientTimeout(total=10, sock_connect=1))
        now = time.monotonic()
        urls = [u for u, m in self.workers.urls if m == self.adapters.get(model, model)]  # an adapter's: its base's
        return self._engine_session, sorted(urls, key=lambda u: self._failed_engines.get(u, 0.0) > now - 10)

    def _engine_failed(self, url: str) -> None:
        now = self._failed_engines[url] = time.monotonic()
        if len(self._failed_engines) > 256:  # replicas come back on new ports: forget old ones
            self._failed_engines = {u: t for u, t in self._failed_engines.items() if t > now - 60}

    async def tokens_moved(self, model: str, bodies: tuple[bytes, bytes]) -> int | None:
        session, urls = self._engines(model)
        return await tokens_moved(session, urls, self.upstream_auth, bodies, self._engine_failed)

    async def detokenized(self, model: str, ids: list[int]) -> str | None:
        session, urls = self._engines(model)
        return await detokenized(session, urls, self.upstream_auth, self.adapters.get(model, model), ids,
                                 self._engine_failed)

    async def look_again(self) -> None:
        look = self.workers.refresh_soon()
        if look is not None:
            await asyncio.shield(look)

    def router_has_none(self, exchange: Exchange) -> None:
        """The router had no worker for the exchange's model (it left since the last look): held
        like any request for a model without a replica, or 503."""
        self.workers.available = self.workers.available - {exchange.model}
        if self.holding.holds(exchange.model) and not self.closing and not exchange.client.closed:
            self.holding.hold_one(exchange)
        else:
            exchange.reject(answers.no_replica(exchange.model))

    # -- dispatch ------------------------------------------------------------------------------

    def answer(self, client: Client, rej: Rejection) -> None:
        self.metrics.refused(rej.reason)
        client.respond(rej.status, rej.body, headers=rej.headers, keep_alive=False if rej.close else None)

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
                    self.answer(client, answers.unknown_model(name, sorted(self.models)))
        elif path in _FORWARDED:
            if method != b"POST":
                self._not_allowed(client, req, b"POST")
            else:
                self.forward(client, req)
        else:
            self.answer(client, answers.unknown_path(path.decode("latin-1"), _SERVED))

    def _not_allowed(self, client: Client, req: Request, allow: bytes) -> None:
        self.answer(client, answers.not_allowed(req.method.decode("latin-1"), req.path.decode("latin-1"), allow))

    def _refuse(self, client: Client, model: str, tenant: str, rej: Rejection) -> None:
        """A request for a served model answered here: counted under the model (and tenant)."""
        self.count(model, str(rej.status), tenant)
        self.answer(client, rej)

    def forward(self, client: Client, req: Request) -> None:
        checked = check_body(req.path, req.body)
        if isinstance(checked, Rejection):
            self.answer(client, checked)
            return
        payload, model = checked
        if model not in self.models:
            self.answer(client, answers.unknown_model(model, sorted(self.models)))
            return
        tenant = req.tenant
        if payload.get("suffix") is not None and req.path == FORWARDED_COMPLETIONS:
            rej = check_fill(model, payload, self.fim, self.config.max_body_bytes)
            if rej is not None:
                self._refuse(client, model, tenant, rej)
                return
        if self.closing:
            self._refuse(client, model, tenant, answers.SHUTTING_DOWN)
            return
        stream = payload.get("stream") is True
        body = None
        if self.config.shed:
            rej = self.shedding.check(self.adapters.get(model, model), tenant)  # the base model's engines' queue
            if rej is not None:
                if tenant:
                    self.metrics.tenant_rejections.labels(tenant, model, rej.reason).inc()
                self._refuse(client, model, tenant, rej)
                return
        if tenant and self.admission.enabled:
            rej = self.admission.admit(tenant, model)
            if rej is not None:
                self.metrics.tenant_rejections.labels(tenant, model, rej.reason).inc()
                self._refuse(client, model, tenant, rej)
                return
            if stream:
                # the engine reports a stream's usage in a last chunk only when asked
                opts = payload.get("stream_options")
                if not (isinstance(opts, dict) and opts.get("include_usage") is True):
                    payload["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
                    body = orjson.dumps(payload)
        exchange = Exchange(self, client, req, model, stream=stream)
        if self.affinity is not None:
            key = self.affinity.choose(model, payload, (self.workers.ready or {}).get(model, 1))
            exchange.session, exchange.on_end = key, functools.partial(self.affinity.done, model, key)
        if tenant and self.admission.enabled:
            exchange.admit(tenant, body)
        if stream and self.migration.limit:
            chat = req.path == FORWARDED_CHAT
            exchange.transcript = Transcript(chat, payload, continuable(chat, payload), self.transcripts)
            exchange.scan = True
            if exchange.transcript.strip_ids:  # it asked for return_token_ids
                exchange.body = orjson.dumps(payload)
        self.active.add(exchange)
        if model in self.workers.available:
            exchange.start()
        elif self.holding.holds(model):
            self.holding.hold_one(exchange)
        else:
            self.spawn(self._recheck(exchange))

    async def _recheck(self, exchange: Exchange) -> None:
        """A replica may have just been registered: look again before answering 503."""
        look = self.workers.refresh_soon()
        if look is not None:
            await asyncio.shield(look)
        if exchange.model in self.workers.available:
            exchange.start()
        else:
            exchange.reject(answers.no_replica(exchange.model))
