"""``codefleet frontend``: router + gateway in one container, engines found through DNS (Kubernetes).

Each model's engines sit behind a headless Service; its DNS name resolves to the pod IPs of the
*ready* engines (Kubernetes drops a pod from the answer when its readiness probe fails). Every
``interval`` seconds the frontend resolves each name and registers new addresses with vllm-router
under the model's served name, removing those that left. No Kubernetes API access (no RBAC) is
needed. The router and gateway are restarted when they die, as in the local runner.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import httpx
from pydantic import Field

from codefleet.errors import CodefleetError, RuntimeStartError
from codefleet.gateway.config import UPSTREAM_KEY_ENV, Hold
from codefleet.manifest import Metrics, Router, Tenant, _Strict
from codefleet.metrics import FleetMetrics
from codefleet.router import Frontend

Resolver = Callable[[str, int], set[str]]


class HoldSpec(_Strict):
    max_requests: int = Field(ge=0)
    timeout_s: float = Field(gt=0)
    cold_start_s: float = Field(60.0, gt=0)


class Target(_Strict):
    model: str
    """Served model name."""
    host: str
    """DNS name of the model's headless Service."""
    port: int = Field(8000, ge=1, le=65535)
    replicas: int | None = Field(None, ge=0)
    """Replicas the chart asks for (the codefleet_replicas_desired gauge); none when KEDA scales it."""
    hold: HoldSpec | None = None
    """Hold requests while the model has no ready replica (it scales from zero)."""
    max_waiting: int | None = Field(None, ge=0)
    """Shed new requests while the model's engines hold more than this many waiting."""


class FrontendConfig(_Strict):
    router: Router
    metrics: Metrics
    targets: list[Target] = Field(min_length=1)
    interval: float = Field(2.0, gt=0)
    """Seconds between DNS look-ups."""
    drain_seconds: float = Field(120, gt=0)
    """On SIGTERM: how long open streams may finish before each ends with an error event."""
    tenants: dict[str, Tenant] = Field(default_factory=dict)
    """Per-tenant limits (the manifest's tenants)."""
    frontend_pods: int = Field(1, ge=1)
    """Frontend pods sharing the tenants' limits: each enforces 1/frontend_pods."""


def resolve_dns(host: str, port: int) -> set[str]:
    """Worker URLs behind a (headless) Service name; empty when the name does not resolve yet."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return set()
    urls = set()
    for family, _, _, _, addr in infos:
        ip = addr[0]
        urls.add(f"http://[{ip}]:{port}" if family == socket.AF_INET6 else f"http://{ip}:{port}")
    return urls


class DnsRegistrar:
    """Keeps vllm-router's worker list equal to what the targets' DNS names resolve to."""

    def __init__(self, frontend: Frontend, targets: list[Target], metrics: FleetMetrics,
                 resolve: Resolver = resolve_dns, say: Callable[[str], None] = print) -> None:
        self.frontend = frontend
        self.targets = targets
        self.metrics = metrics
        self.resolve = resolve
        self.say = say
        self.registered: dict[str, str] = {}  # worker URL -> model

    def sync(self) -> None:
        for component in self.frontend.check():
            self.metrics.component_restarts.labels(component).inc()
            if component == "router":
                self.registered.clear()
        wanted: dict[str, str] = {}
        for t in self.targets:
            urls = self.resolve(t.host, t.port)
            self.metrics.replicas_ready.labels(t.model).set(len(urls))
            for u in urls:
                wanted[u] = t.model
        admin = self.frontend.admin
        for url, model in list(self.registered.items()):
            if wanted.get(url) != model:
                try:
                    admin.remove(url)
                except (httpx.HTTPError, RuntimeStartError) as exc:
                    self.say(f"  could not remove {url} ({model}): {exc}; retrying")
                    continue
                del self.registered[url]
                self.metrics.registrations.labels(model, "remove").inc()
                self.say(f"  {model}: {url} removed")
        for url, model in wanted.items():
            if url not in self.registered:
                try:
                    admin.add(url, model)
                except (httpx.HTTPError, RuntimeStartError) as exc:
                    self.say(f"  could not register {url} ({model}): {exc}; retrying")
                    continue
                self.registered[url] = model
                self.metrics.registrations.labels(model, "add").inc()
                self.say(f"  {model}: {url} registered")


def run(config_path: str, run_dir: Path) -> int:
    try:
        cfg = FrontendConfig.model_validate_json(Path(config_path).read_text())
    except OSError as exc:
        raise CodefleetError(f"{config_path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CodefleetError(f"{config_path}: {exc}") from None
    models = tuple(dict.fromkeys(t.model for t in cfg.targets))
    fe = Frontend(cfg.router, cfg.metrics, models, run_dir, sys.executable,
                  manifest_dir=Path(config_path).parent, upstream_key=os.environ.get(UPSTREAM_KEY_ENV) or None,
                  drain_s=cfg.drain_seconds,
                  hold={t.model: Hold(t.hold.max_requests, t.hold.timeout_s, t.hold.cold_start_s)
                        for t in cfg.targets if t.hold is not None and t.hold.max_requests > 0},
                  tenants=dict(cfg.tenants), frontend_pods=cfg.frontend_pods,
                  shed={t.model: t.max_waiting for t in cfg.targets if t.max_waiting is not None})
    metrics = FleetMetrics()
    for t in cfg.targets:
        if t.replicas is not None:
            metrics.replicas_desired.labels(t.model).set(t.replicas)
    metrics.serve(cfg.metrics.host, cfg.metrics.launcher_port)
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fe.start()
    print(f"frontend on {fe.url}/v1 for {', '.join(models)}; router logs in {run_dir / 'logs'}", flush=True)
    registrar = DnsRegistrar(fe, cfg.targets, metrics, say=lambda s: print(s, flush=True))
    try:
        while not stopping:
            registrar.sync()
            deadline = time.monotonic() + cfg.interval
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        fe.stop()
        metrics.close()
    return 0
