"""LoRA adapters on running engines (local and Ray runtimes): loaded into every ready replica of
their model, and only then routed to it; unrouted first, then unloaded, when ``apply`` removes one.

The engines run with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 (codefleet.engine), which gives them
vLLM's ``POST /v1/load_lora_adapter`` ({"lora_name", "lora_path"}; 200 with a plain-text body) and
``POST /v1/unload_lora_adapter`` ({"lora_name"}) (vllm/entrypoints/serve/lora/api_router.py).
Neither is idempotent: a second load of a name answers 400 "has already been loaded" and an unload
of an unknown one 404 (vllm/entrypoints/openai/models/serving.py); both are taken as done here, so a
replica whose router registration was lost (a router restart, a health blip) is simply synced again.
Unload only forgets the name in the API server (the weights stay in the engine's LRU cache of
``max_cpu_loras`` until evicted); a request that names it afterwards gets vLLM's 404.

Each (replica, adapter) pair is one worker of vllm-router under the adapter's name, at an alias
of the engine's URL (codefleet.lora.alias_url). A replica that starts later, or again after a
crash, gets its model's adapters before its aliases are registered: the router never sends an
adapter's request to an engine that has not loaded it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from codefleet import demo_models, lora_build
from codefleet.errors import RuntimeStartError
from codefleet.lora import AdapterPlan, alias_url, demo_seed
from codefleet.plans import FleetPlan, ReplicaPlan

#: A load that failed is tried again after this long (the adapter's files may be fixed, or the
#: engine was busy).
RETRY_S = 10.0
#: Loading reads the adapter's files and copies them into the engine's cache: small, but on a busy
#: 2-core machine it can take a few seconds.
LOAD_TIMEOUT_S = 60.0


def demo_root() -> Path:
    return demo_models.cache_root().parent / "demo-adapters"


def prepare(plan: FleetPlan, say: Callable[[str], None]) -> dict[tuple[str, str], str]:
    """Every adapter's folder, made ready before any engine is asked to load it: demo adapters
    built, Hugging Face ones downloaded into the weight cache (with their revision). Keyed by
    (model, adapter)."""
    paths: dict[tuple[str, str], str] = {}
    for p in plan.models:
        if p.lora is None:
            continue
        for a in p.lora.adapters:
            paths[(p.name, a.name)] = fetch(p, a, say)
    return paths


def fetch(p: ReplicaPlan, a: AdapterPlan, say: Callable[[str], None]) -> str:
    seed = demo_seed(a.source)
    if seed is not None:
        assert p.demo is not None
        model_dir = demo_models.ensure(p.demo)
        base = demo_models.TRAINED.get(p.demo, p.source)
        return str(lora_build.ensure(demo_root(), model_dir, seed, base))
    if a.path:
        return a.path
    from huggingface_hub import snapshot_download

    say(f"  fetch  adapter {a.name}: {a.source} (revision {a.revision or 'main'})")
    try:
        return str(snapshot_download(a.source, revision=a.revision,
                                     allow_patterns=["adapter_config.json", "adapter_model.*"]))
    except Exception as exc:  # the hub's errors are many; the message says which
        raise RuntimeStartError(f"adapter {a.name}: cannot fetch {a.source} (revision {a.revision or 'main'}): "
                                f"{exc}") from None


@dataclass
class Loaded:
    """An adapter on one replica: loaded from ``path`` and registered with the router at ``alias``."""

    path: str
    alias: str


@dataclass
class ReplicaAdapters:
    """What one replica has (its ``Replica.adapters``)."""

    loaded: dict[str, Loaded] = field(default_factory=dict)
    #: Adapters whose last load failed: when to try again, and vLLM's message.
    failed: dict[str, tuple[float, str]] = field(default_factory=dict)

    def free_alias(self, url: str) -> str:
        used = {x.alias for x in self.loaded.values()}
        n = 1
        while alias_url(url, n) in used:
            n += 1
        return alias_url(url, n)


def _post(client: httpx.Client, url: str, path: str, body: dict[str, str], headers: dict[str, str]) -> httpx.Response:
    return client.post(url + path, json=body, headers=headers, timeout=LOAD_TIMEOUT_S)


def load(client: httpx.Client, url: str, name: str, path: str, headers: dict[str, str]) -> str | None:
    """Load ``name`` into the engine at ``url``; None when it is there, else what went wrong."""
    try:
        r = _post(client, url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, headers)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if r.status_code == 200 or (r.status_code == 400 and "already been loaded" in r.text):
        return None
    return f"HTTP {r.status_code}: {r.text[:500]}"


def unload(client: httpx.Client, url: str, name: str, headers: dict[str, str]) -> str | None:
    try:
        r = _post(client, url, "/v1/unload_lora_adapter", {"lora_name": name}, headers)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if r.status_code in (200, 404) else f"HTTP {r.status_code}: {r.text[:500]}"


def sync(client: httpx.Client, url: str, have: ReplicaAdapters, want: dict[str, str], headers: dict[str, str],
         add: Callable[[str, str], None], remove: Callable[[str], None], say: Callable[[str], None],
         who: str, now: float | None = None) -> bool:
    """Bring one ready, registered replica to ``want`` (adapter -> folder): aliases of adapters no
    longer wanted (or now from another folder) leave the router, then are unloaded; wanted ones
    are loaded, then registered. Returns whether anything changed."""
    now = time.monotonic() if now is None else now
    changed = False
    for name in [n for n, x in have.loaded.items() if want.get(n) != x.path]:
        x = have.loaded.pop(name)
        remove(x.alias)
        why = unload(client, url, name, headers)
        say(f"  adapter {name} off {who}" + (f" (unload: {why})" if why else ""))
        changed = True
    for name, path in want.items():
        if name in have.loaded:
            continue
        retry = have.failed.get(name)
        if retry is not None and now < retry[0]:
            continue
        why = load(client, url, name, path, headers)
        if why is not None:
            have.failed[name] = (now + RETRY_S, why)
            say(f"  adapter {name} on {who}: load failed, retrying in {RETRY_S:.0f} s: {why}")
            continue
        have.failed.pop(name, None)
        alias = have.free_alias(url)
        add(alias, name)
        have.loaded[name] = Loaded(path, alias)
        say(f"  adapter {name} on {who} ({alias})")
        changed = True
    for name in [n for n in have.failed if n not in want]:
        del have.failed[name]
    return changed
