"""The fleet's front: vllm-router (routing) and the gateway (OpenAI gaps), as processes on this host.

``Frontend`` starts both, restarts either if it dies, and registers engine replicas with the
router under their served model name (vllm-router's IGW mode: ``POST /workers``,
``DELETE /workers/{url}``). The public address is the gateway's; the router and the engines
listen on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import secrets
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from codefleet.errors import RuntimeStartError, SecretError
from codefleet.frontend_config import FrontendSettings, frontend_settings
from codefleet.gateway.config import DEFAULT_TENANT, DRAIN_S, UPSTREAM_KEY_ENV, GatewayConfig, Hold
from codefleet.manifest import TENANT_NAME, ApiKeys, CacheAware, Metrics, Router, Tenant
from codefleet.plans import FleetPlan
from codefleet.procs import free_port, spawn, stop_group, tail

Say = Callable[[str], None]

#: vllm-router settings codefleet fixes (the policy comes from the manifest).
ROUTER_FLAGS = (
    "--enable-igw",
    # The launcher removes a dead replica within a second; the router's own probe is the backstop
    # for engines that hang without exiting.
    "--health-check-interval-secs", "5",
    "--health-failure-threshold", "2",
    "--log-level", "warning",
)


def router_argv(python: str, policy: str, port: int, metrics_host: str, metrics_port: int,
                cache_aware: CacheAware | None = None) -> list[str]:
    # prefix_affinity: the gateway picks each request's key (x-session-id); sticky_least_loaded keeps a
    # key on one replica and places a new key on the replica with the fewest
    router_policy = "sticky_least_loaded" if policy == "prefix_affinity" else policy
    argv = [python, "-m", "vllm_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--policy", router_policy, "--prometheus-host", metrics_host, "--prometheus-port", str(metrics_port),
            *ROUTER_FLAGS]
    if policy == "cache_aware":
        c = cache_aware or CacheAware()
        argv += ["--cache-threshold", f"{c.cache_threshold:g}", "--balance-abs-threshold", str(c.balance_abs_threshold),
                 "--balance-rel-threshold", f"{c.balance_rel_threshold:g}", "--max-tree-size", str(c.max_tree_size),
                 "--eviction-interval-secs", str(c.eviction_interval_s)]
    return argv


def router_env(router: Router) -> dict[str, str]:
    """The router's environment (sticky_least_loaded reads its session lifetime from it)."""
    if router.policy == "prefix_affinity":
        return {"VLLM_ROUTER_SLL_SESSION_EXPIRATION_IN_S": str(router.prefix_affinity.session_seconds)}
    return {}


def gateway_affinity(router: Router) -> dict[str, float] | None:
    """What the gateway is told of prefix affinity (None: the policy is another)."""
    if router.policy != "prefix_affinity":
        return None
    return router.prefix_affinity.model_dump(exclude={"session_seconds"})


@dataclass(frozen=True)
class ClientKey:
    """One client key as the gateway knows it: the tenant it belongs to and its SHA-256."""

    tenant: str
    sha256: str


_TENANT_RE = re.compile(TENANT_NAME)


def split_key_entry(entry: str) -> tuple[str, str]:
    """``[TENANT:]KEY`` or ``[TENANT:]sha256:HEX`` -> (tenant, the rest)."""
    head, sep, rest = entry.partition(":")
    if sep and head != "sha256" and _TENANT_RE.fullmatch(head) and rest:
        return head, rest.strip()
    return DEFAULT_TENANT, entry


def _client_key(entry: str, where: str, tenants: Collection[str]) -> ClientKey:
    """``[TENANT:]KEY`` or ``[TENANT:]sha256:HEX`` (the key's SHA-256 instead of the key)."""
    tenant, value = split_key_entry(entry)
    if value.startswith("sha256:"):
        digest = value[len("sha256:"):].strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise SecretError(f"{where}: sha256: must be followed by 64 hex digits (the key's SHA-256)")
    else:
        digest = hashlib.sha256(value.encode()).hexdigest()
    if tenants and tenant not in tenants:
        raise SecretError(f"{where}: tenant {tenant!r} is not in the manifest's tenants "
                          f"({', '.join(sorted(tenants))})" + ("; a key without 'TENANT:' belongs to 'default'"
                                                               if tenant == DEFAULT_TENANT else ""))
    return ClientKey(tenant, digest)


def load_api_keys(spec: ApiKeys | None, base: Path, tenants: Collection[str] = ()) -> list[ClientKey]:
    """The client keys named by the manifest: an environment variable (comma-separated) or a file
    (one per line, # for comments); each ``[TENANT:]KEY`` or ``[TENANT:]sha256:HEX``. With
    ``tenants``, every key's tenant must be one of them. Errors name the variable or file and line,
    never a key."""
    if spec is None:
        return []
    if spec.env is not None:
        raw = os.environ.get(spec.env, "")
        entries = [(f"${spec.env} entry {i + 1}", k.strip()) for i, k in enumerate(raw.split(",")) if k.strip()]
        if not entries:
            raise SecretError(f"router.api_keys.env: environment variable {spec.env} is unset or empty; "
                              f"export it with one or more comma-separated keys")
    else:
        assert spec.file is not None
        path = Path(spec.file) if os.path.isabs(spec.file) else base / spec.file
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise SecretError(f"router.api_keys.file: cannot read {path}: {exc.strerror}") from None
        entries = [(f"{path}:{n}", ln.strip()) for n, ln in enumerate(lines, 1)
                   if ln.strip() and not ln.lstrip().startswith("#")]
        if not entries:
            raise SecretError(f"router.api_keys.file: {path} holds no key (one per line, # for comments)")
    return [_client_key(entry, where, tenants) for where, entry in entries]


def raise_fd_limit() -> None:
    """Every open client stream costs the gateway and the router two sockets: lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class RouterAdmin:
    """vllm-router's worker API."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self._client = httpx.Client(timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def add(self, worker_url: str, model: str) -> None:
        r = self._client.post(f"{self.url}/workers", json={"url": worker_url, "model_id": model})
        if r.status_code >= 400:
            raise RuntimeStartError(f"router refused worker {worker_url} ({model}): {r.status_code} {r.text}")

    def remove(self, worker_url: str) -> None:
        r = self._client.delete(f"{self.url}/workers/{urllib.parse.quote(worker_url, safe='')}")
        if r.status_code >= 400 and r.status_code != 404:
            raise RuntimeStartError(f"router did not remove worker {worker_url}: {r.status_code} {r.text}")

    def workers(self) -> list[dict[str, Any]]:
        data: dict[str, Any] = self._client.get(f"{self.url}/workers").json()
        return list(data.get("workers", []))

    def healthy(self) -> bool:
        try:
            return self._client.get(f"{self.url}/health").status_code == 200
        except httpx.HTTPError:
            return False


@dataclass
class Frontend:
    """vllm-router plus the gateway; ``url`` is the fleet's one OpenAI endpoint."""

    router: Router
    metrics: Metrics
    models: tuple[str, ...]
    run_dir: Path
    python: str
    manifest_dir: Path = field(default_factory=Path.cwd)
    say: Say = print
    upstream_key: str | None = None
    drain_s: float = DRAIN_S
    """The gateway's drain on SIGTERM: how long open streams may finish."""
    hold: dict[str, Hold] = field(default_factory=dict)
    """Models whose requests the gateway holds while they have no ready replica (scale from zero)."""
    tenants: dict[str, Tenant] = field(default_factory=dict)
    """Per-tenant limits the gateway enforces (the manifest's ``tenants``)."""
    frontend_pods: int = 1
    """Frontend processes sharing the tenants' limits (each enforces its share)."""
    shed: dict[str, int] = field(default_factory=dict)
    """Per model: the engines' waiting requests above which new requests are shed (429)."""
    fim: dict[str, str] = field(default_factory=dict)
    """Per model that fills in the middle: its format."""
    adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapter -> its base model."""
    router_port: int = 0
    router_metrics_port: int = 0
    gateway_port: int = 0
    gateway_metrics_port: int = 0
    router_proc: subprocess.Popen[bytes] | None = None
    gateway_proc: subprocess.Popen[bytes] | None = None
    _admin: RouterAdmin | None = field(default=None, repr=False)

    @classmethod
    def for_plan(cls, plan: FleetPlan, run_dir: Path, python: str, say: Say = print) -> Frontend:
        """``codefleet up``'s frontend: the plan's ``frontend_settings``."""
        # with LoRA, engines take a key even without client keys: their load/unload endpoints are the launcher's
        key = secrets.token_urlsafe(32) if any(p.lora is not None for p in plan.models) else None
        return cls.from_settings(frontend_settings(plan), run_dir, python, say=say, upstream_key=key)

    @classmethod
    def from_settings(cls, s: FrontendSettings, run_dir: Path, python: str, say: Say = print,
                      upstream_key: str | None = None) -> Frontend:
        return cls(s.router, s.metrics, s.models, run_dir, python, manifest_dir=s.manifest_dir, say=say,
                   upstream_key=upstream_key, drain_s=s.drain_s, hold=dict(s.hold), tenants=dict(s.tenants),
                   frontend_pods=s.frontend_pods, shed=dict(s.shed), fim=dict(s.fim),
                   adapters=dict(s.adapters))

    def __post_init__(self) -> None:
        r, m = self.router, self.metrics
        keys = load_api_keys(r.api_keys, self.manifest_dir, tuple(self.tenants))
        self.key_sha256 = tuple(k.sha256 for k in keys)
        self.key_tenants = {k.sha256: k.tenant for k in keys}
        if keys and self.upstream_key is None:  # engines then refuse what does not come through the gateway
            self.upstream_key = secrets.token_urlsafe(32)
        self.router_port = free_port()
        self.router_metrics_port = m.router_port or free_port(m.host)
        self.gateway_port = r.port or free_port(r.host)
        self.gateway_metrics_port = m.gateway_port or free_port(m.host)

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    @property
    def url(self) -> str:
        host = self.router.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{shown}:{self.gateway_port}"

    @property
    def admin(self) -> RouterAdmin:
        if self._admin is None:
            self._admin = RouterAdmin(self.router_url)
        return self._admin

    @property
    def engine_env(self) -> dict[str, str]:
        """Environment every engine gets so that only the gateway's requests are served."""
        return {"VLLM_API_KEY": self.upstream_key} if self.upstream_key else {}

    def gateway_config(self) -> GatewayConfig:
        r, m = self.router, self.metrics
        return GatewayConfig(
            router_url=self.router_url, models=self.models,
            host=r.host, port=self.gateway_port, metrics_host=m.host, metrics_port=self.gateway_metrics_port,
            key_sha256=self.key_sha256, max_body_bytes=r.max_body_mib * 1024 * 1024, limits=r.limits,
            drain_s=self.drain_s, hold=self.hold, key_tenants=self.key_tenants,
            tenants={n: t.model_dump(exclude_none=True) for n, t in self.tenants.items()},
            frontend_pods=self.frontend_pods, shed=self.shed, fim=self.fim, affinity=gateway_affinity(r),
            migration=r.migration.model_dump(), adapters=self.adapters,
        )

    def _launch_router(self) -> None:
        argv = router_argv(self.python, self.router.policy, self.router_port, self.metrics.host,
                           self.router_metrics_port, self.router.cache_aware)
        self.router_proc = spawn(argv, router_env(self.router), self.run_dir / "logs" / "router.log")

    def _launch_gateway(self) -> None:
        cfg = self.run_dir / "gateway.json"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.gateway_config().to_json())
        env = {UPSTREAM_KEY_ENV: self.upstream_key} if self.upstream_key else {}
        self.gateway_proc = spawn([self.python, "-m", "codefleet.gateway", "--config", str(cfg)], env,
                                  self.run_dir / "logs" / "gateway.log")

    def start(self, timeout: float = 60.0) -> None:
        raise_fd_limit()
        for log in ("router.log", "gateway.log"):
            (self.run_dir / "logs" / log).unlink(missing_ok=True)
        self._launch_router()
        self._launch_gateway()
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending: dict[str, tuple[str, Callable[[], subprocess.Popen[bytes] | None]]] = {
            "router": (self.router_url, lambda: self.router_proc),
            "gateway": (f"http://127.0.0.1:{self.gateway_port}", lambda: self.gateway_proc),
        }
        with httpx.Client(timeout=1.0) as client:
            while pending:
                for name, (url, proc) in list(pending.items()):
                    p = proc()
                    assert p is not None
                    if p.poll() is not None:
                        log = self.run_dir / "logs" / f"{name}.log"
                        raise RuntimeStartError(f"{name} exited with status {p.returncode} while starting; "
                                                f"last lines of {log}:\n{tail(log)}")
                    try:
                        if client.get(url + "/health").status_code == 200:
                            del pending[name]
                    except httpx.HTTPError:
                        pass
                if pending and time.monotonic() > deadline:
                    raise RuntimeStartError(f"{', '.join(pending)} not healthy after {timeout:.0f} s; "
                                            f"logs in {self.run_dir / 'logs'}")
                time.sleep(0.1)

    def check(self) -> list[str]:
        """Restart a dead router or gateway; returns which were restarted.

        After a router restart every replica must be registered again.
        """
        restarted = []
        for name, proc, launch in (("router", self.router_proc, self._launch_router),
                                   ("gateway", self.gateway_proc, self._launch_gateway)):
            if proc is not None and proc.poll() is not None:
                self.say(f"  {name} exited with status {proc.returncode}; restarting")
                stop_group(proc.pid, grace=2)
                launch()
                restarted.append(name)
        if restarted:
            self._wait(60)
        return restarted

    def refresh_gateway(self) -> None:
        """Ask the gateway to read the router's worker list now (a replica just left it)."""
        if self.gateway_proc is not None and self.gateway_proc.poll() is None:
            try:
                os.kill(self.gateway_proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    def reload_gateway(self, tenants: dict[str, Tenant], fim: dict[str, str] | None = None,
                       adapters: dict[str, str] | None = None, hold: dict[str, Hold] | None = None) -> None:
        """Keys (read again), tenants' limits, fill formats, adapters and holds to the running gateway (its
        file rewritten, then SIGHUP). A key naming an unknown tenant raises SecretError first, changing nothing."""
        keys = load_api_keys(self.router.api_keys, self.manifest_dir, tuple(tenants))
        self.tenants = dict(tenants)
        if fim is not None:
            self.fim = dict(fim)
        if adapters is not None:
            self.adapters = dict(adapters)
        if hold is not None:
            self.hold = dict(hold)
        self.key_sha256 = tuple(k.sha256 for k in keys)
        self.key_tenants = {k.sha256: k.tenant for k in keys}
        cfg = self.run_dir / "gateway.json"
        tmp = cfg.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # key digests: the owner's only
        with os.fdopen(fd, "w") as f:
            f.write(self.gateway_config().to_json())
        tmp.replace(cfg)
        if self.gateway_proc is not None and self.gateway_proc.poll() is None:
            os.kill(self.gateway_proc.pid, signal.SIGHUP)

    def gateway_closing(self) -> None:
        """The fleet is stopping: the gateway answers held and new requests 503 instead of holding
        them for replicas that will not come (streams in flight go on)."""
        if self.gateway_proc is not None and self.gateway_proc.poll() is None:
            try:
                os.kill(self.gateway_proc.pid, signal.SIGUSR2)
            except ProcessLookupError:
                pass

    def pgids(self) -> list[int]:
        return [p.pid for p in (self.gateway_proc, self.router_proc) if p is not None]

    def stop(self, grace: float = 5.0) -> None:
        """The gateway first (it lets open streams finish for up to ``drain_s``, then ends them
        with an error event), then the router."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        for p, wait in ((self.gateway_proc, self.drain_s + grace), (self.router_proc, grace)):
            if p is not None:
                stop_group(p.pid, wait)
                try:
                    p.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass


def first_key(path: str | Path) -> str:  # the first key of a key file (TENANT: removed); digests cannot be sent
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            _, key = split_key_entry(line.strip())
            if not key.startswith("sha256:"):
                return key
    raise SecretError(f"{path}: no key that can be sent (empty, or digests only)")
