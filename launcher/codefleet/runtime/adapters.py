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

import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
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
#: Between an adapter's alias leaving the router and its unload: a request the router had just sent
#: there still finds it (the reconcile loop's ROUTER_QUIET_S for a draining replica).
QUIET_S = 1.0


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


def loaded_from(client: httpx.Client, url: str, name: str, headers: dict[str, str]) -> str | None:
    """The folder the engine loaded ``name`` from (its /v1/models card's ``root``), None if it has none."""
    try:
        cards = client.get(url + "/v1/models", headers=headers, timeout=LOAD_TIMEOUT_S).json().get("data", [])
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return next((str(c.get("root")) for c in cards if isinstance(c, dict) and c.get("id") == name), None)


def load(client: httpx.Client, url: str, name: str, path: str, headers: dict[str, str]) -> str | None:
    """Load ``name`` from ``path`` into the engine at ``url``; None when it is there, else what went
    wrong. A name the engine already has (vLLM's 400) counts only when it came from ``path``; from
    another folder it is unloaded and loaded again."""
    for attempt in (1, 2):
        try:
            r = _post(client, url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if r.status_code == 200:
            return None
        if r.status_code == 400 and "already been loaded" in r.text:
            if loaded_from(client, url, name, headers) == path:
                return None
            if attempt == 1 and unload(client, url, name, headers) is None:
                continue
        return f"HTTP {r.status_code}: {r.text[:500]}"
    return None


def unload(client: httpx.Client, url: str, name: str, headers: dict[str, str]) -> str | None:
    try:
        r = _post(client, url, "/v1/unload_lora_adapter", {"lora_name": name}, headers)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if r.status_code in (200, 404) else f"HTTP {r.status_code}: {r.text[:500]}"


def needs_sync(have: ReplicaAdapters, want: dict[str, str], now: float) -> bool:
    """Something to do: an adapter to unroute (not wanted, or from another folder), or one to load
    (not loaded, and not waiting for its retry)."""
    if any(want.get(n) != x.path for n, x in have.loaded.items()):
        return True
    return any(n not in have.loaded and (n not in have.failed or now >= have.failed[n][0]) for n in want)


def sync(client: httpx.Client, url: str, have: ReplicaAdapters, want: dict[str, str], headers: dict[str, str],
         add: Callable[[str, str], None], remove: Callable[[str, str], None], say: Callable[[str], None],
         who: str, now: float | None = None, lock: AbstractContextManager[object] | None = None,
         still: Callable[[], bool] = lambda: True, quiet_s: float = QUIET_S) -> bool:
    """Bring one ready, registered replica to ``want`` (adapter -> folder): aliases of adapters no
    longer wanted (or now from another folder) leave the router, then, ``quiet_s`` later (requests
    the router sent just before reach the engine), they are unloaded; wanted ones are loaded, then
    registered. The engine calls run without ``lock``; what the replica has and the router's
    registrations change under it, and only while ``still()`` (the replica is the same engine and
    registered). Returns whether anything changed."""
    now = time.monotonic() if now is None else now
    guard = lock if lock is not None else contextlib.nullcontext()
    with guard:
        if not still():
            return False
        leaving = [(n, have.loaded.pop(n)) for n in [n for n, x in have.loaded.items() if want.get(n) != x.path]]
        for name, x in leaving:
            remove(x.alias, name)
    if leaving:
        time.sleep(quiet_s)
        for name, _ in leaving:
            why = unload(client, url, name, headers)
            say(f"  adapter {name} off {who}" + (f" (unload: {why})" if why else ""))
    changed = bool(leaving)
    for name, path in want.items():
        with guard:
            retry = have.failed.get(name)
            if not still() or name in have.loaded or (retry is not None and now < retry[0]):
                continue
        why = load(client, url, name, path, headers)
        with guard:
            if not still():
                return changed
            alias = ""
            if why is None:
                try:
                    alias = have.free_alias(url)
                except ValueError as exc:  # not an address the router can be given an alias of
                    why = str(exc)
            if why is not None:
                have.failed[name] = (now + RETRY_S, why)
                say(f"  adapter {name} on {who}: not served, retrying in {RETRY_S:.0f} s: {why}")
                continue
            have.failed.pop(name, None)
            add(alias, name)
            have.loaded[name] = Loaded(path, alias)
            say(f"  adapter {name} on {who} ({alias})")
            changed = True
    with guard:
        for name in [n for n in have.failed if n not in want]:
            del have.failed[name]
    return changed


class AdapterSync:
    """Each replica's ``sync`` in a worker thread: loading an adapter takes seconds on a busy host,
    and the reconcile loop (crash detection, drains, ``apply``) must not wait for it."""

    def __init__(self, lock: AbstractContextManager[object], say: Callable[[str], None]) -> None:
        self.lock = lock
        self.say = say
        self.client = httpx.Client()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="codefleet-adapters")
        self.jobs: dict[int, concurrent.futures.Future[bool]] = {}

    def busy(self, key: int) -> bool:
        job = self.jobs.get(key)
        return job is not None and not job.done()

    def start(self, key: int, url: str, have: ReplicaAdapters, want: dict[str, str], headers: dict[str, str],
              add: Callable[[str, str], None], remove: Callable[[str, str], None], who: str,
              still: Callable[[], bool]) -> None:
        """Called under the lock, for a ready and registered replica: a job unless one runs or there
        is nothing to do."""
        if self.busy(key) or not needs_sync(have, want, time.monotonic()):
            return

        def done(job: concurrent.futures.Future[bool]) -> None:
            if not job.cancelled() and job.exception() is not None:
                self.say(f"  adapters of {who}: {job.exception()}; trying again")

        self.jobs = {k: j for k, j in self.jobs.items() if not j.done()}
        job = self.pool.submit(sync, self.client, url, have, dict(want), headers, add, remove, self.say, who,
                               None, self.lock, still)
        job.add_done_callback(done)
        self.jobs[key] = job

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
