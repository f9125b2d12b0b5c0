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

from codefleet.errors import CodefleetError, RuntimeStartError
from codefleet.frontend_config import FrontendConfig, Target
from codefleet.gateway.config import UPSTREAM_KEY_ENV
from codefleet.lora import alias_url
from codefleet.metrics import FleetMetrics
from codefleet.router import Frontend

__all__ = ["DnsRegistrar", "FrontendConfig", "Target", "resolve_dns", "run"]

Resolver = Callable[[str, int], set[str]]


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
        self.pod_adapters: dict[str, list[str]] = {}  # pod URL -> the adapters its engine has (fixed for its life)

    def adapters_of(self, url: str, model: str, adapters: list[str]) -> list[str]:
        """The adapters of ``adapters`` the pod's engine has loaded (its /v1/models, vLLM's cards with
        ``parent``), asked once per pod: a pod still running an older list (a rollout adding one) is
        routed only what it has."""
        if url not in self.pod_adapters:
            key = self.frontend.upstream_key
            try:
                cards = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {},
                                  timeout=2).json()["data"]
                self.pod_adapters[url] = sorted(str(c["id"]) for c in cards if c.get("parent") == model)
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                return []  # asked again at the next look
        return [a for a in self.pod_adapters[url] if a in adapters]

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
                # the chart's engines load their adapters before they are ready (--lora-modules): each
                # one a pod has is a worker of that adapter, at an alias of the pod's address
                for n, adapter in enumerate(self.adapters_of(u, t.model, t.adapters) if t.adapters else [], start=1):
                    try:
                        wanted[alias_url(u, n)] = adapter
                    except ValueError:  # an IPv6 pod address has no alias spelling (docs/lora.md)
                        break
        self.pod_adapters = {u: a for u, a in self.pod_adapters.items() if u in wanted}
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
    settings = cfg.settings(Path(config_path).parent)
    models = settings.models
    fe = Frontend.from_settings(settings, run_dir, sys.executable,
                                upstream_key=os.environ.get(UPSTREAM_KEY_ENV) or None)
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
