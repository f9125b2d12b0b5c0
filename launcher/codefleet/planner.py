"""Capacity planner: what fits where, decided before anything starts.

Memory per GPU of one replica, at tensor parallel size TP:

    weights / TP  +  reserve  +  KV cache  <=  memory * gpu_memory_utilization

* weights: every parameter (all experts of an MoE) times the dtype's bytes;
* KV cache per token per GPU: 2 (K and V) * layers * KV heads per rank * head_dim * bytes,
  where KV heads per rank = KV heads / TP, or 1 when TP exceeds the KV heads (vLLM replicates);
* reserve: RESERVE_FIXED_GIB for the CUDA context, NCCL buffers and CUDA graphs, plus the
  activations of one scheduler step of MAX_BATCHED_TOKENS tokens (the residual stream, the
  attention projections and the MLP intermediate of one layer live at once). vLLM profiles
  this peak at start-up; the planner estimates it so the answer comes before a model load.

On the CPU (gpu: cpu) the KV cache is a fixed VLLM_CPU_KVCACHE_SPACE per rank and only the KV
capacity is planned; vLLM logs the same number at start ("CPU KV cache size: N tokens").
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codefleet.catalog import CATALOG
from codefleet.errors import PlanError
from codefleet.gpus import GPUS
from codefleet.manifest import LoadedManifest, Metrics, Router, Tenant
from codefleet.resolve import ResolvedModel, resolve
from codefleet.shapes import ModelShape

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RESERVE_FIXED_GIB = 1.0
MAX_BATCHED_TOKENS = 8192


def parameter_count(s: ModelShape) -> int:
    """Every parameter, biases and norms included (all experts of an MoE)."""
    h, kv_dim, q_dim = s.hidden_size, s.num_kv_heads * s.head_dim, s.num_heads * s.head_dim
    attn = h * q_dim + 2 * h * kv_dim + q_dim * h
    if s.qkv_bias:
        attn += q_dim + 2 * kv_dim
    if s.out_bias:
        attn += h
    n_mats = 3 if s.mlp_kind == "gated" else 2
    mlp = n_mats * h * s.intermediate_size
    if s.mlp_bias:
        mlp += (2 * s.intermediate_size if s.mlp_kind == "gated" else s.intermediate_size) + h
    if s.is_moe:
        mlp = s.num_experts * mlp + h * s.num_experts  # experts + router
    norm = 2 * h if s.norm_kind == "layer" else h
    layer = attn + mlp + 2 * norm
    embed = s.vocab_size * h
    total = s.num_layers * layer + embed + norm
    if not s.tie_word_embeddings:
        total += embed
    if s.learned_positions:
        total += s.max_position * h
    return total


def active_parameter_count(s: ModelShape) -> int:
    """Parameters read per token: for an MoE only the routed experts count."""
    total = parameter_count(s)
    if not s.is_moe:
        return total
    expert = 3 * s.hidden_size * s.intermediate_size
    return total - s.num_layers * (s.num_experts - s.experts_per_token) * expert


def kv_heads_per_rank(s: ModelShape, tp: int) -> int:
    return max(1, s.num_kv_heads // tp)


def kv_bytes_per_token(s: ModelShape, dtype_bytes: int, tp: int = 1) -> int:
    """KV-cache bytes per token on each GPU of a replica."""
    return 2 * s.num_layers * kv_heads_per_rank(s, tp) * s.head_dim * dtype_bytes


def reserve_bytes(s: ModelShape, dtype_bytes: int, tp: int) -> int:
    per_token = (4 * s.hidden_size + 2 * s.intermediate_size // tp) * dtype_bytes
    return int(RESERVE_FIXED_GIB * GiB + MAX_BATCHED_TOKENS * per_token)


def valid_tp(s: ModelShape) -> list[int]:
    return [
        n
        for n in s.valid_tensor_parallel_sizes()
        if s.num_kv_heads % n == 0 or n % s.num_kv_heads == 0
    ]


@dataclass(frozen=True)
class Estimate:
    """Roofline upper bounds, not measurements."""

    decode_tokens_per_s_batch1: float
    decode_tokens_per_s_max_batch: float
    max_batch: int
    prefill_seconds: float
    prefill_prompt_tokens: int


@dataclass(frozen=True)
class ReplicaPlan:
    """One model's plan; every replica of it is the same."""

    name: str
    source: str
    model_ref: str
    family: str
    accelerator: str
    dtype: str
    tensor_parallel_size: int
    replicas: int
    max_model_len: int
    gpu_memory_utilization: float
    chat_template: Path
    parameters: int
    weight_bytes: int
    weight_bytes_per_gpu: int
    kv_bytes_per_token_per_gpu: int
    reserve_bytes_per_gpu: int
    kv_bytes_per_gpu: int
    kv_tokens: int
    full_length_sequences: float
    replicas_per_node: int
    nodes: int
    cpu_kv_cache_gib: int
    estimate: Estimate | None
    #: Sampling defaults for --override-generation-config.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    stop_tokens: tuple[str, ...] = ()
    stop_strings: tuple[str, ...] = ()
    engine_args: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    revision: str | None = None
    demo: str | None = None
    #: Drain budget (seconds) of a replica leaving service; vLLM's --shutdown-timeout.
    drain_seconds: int = 120
    #: None: ``replicas`` is fixed; else replicas follow load and ``replicas`` is the starting count.
    autoscale: Autoscale | None = None
    #: Overload shedding threshold (the engines' waiting requests); None: no shedding.
    max_waiting: int | None = None

    @property
    def max_replicas(self) -> int:
        return self.autoscale.max_replicas if self.autoscale else self.replicas

    @property
    def gpus_per_replica(self) -> int:
        return 0 if self.accelerator == "cpu" else self.tensor_parallel_size

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["chat_template"] = str(self.chat_template)
        out["gpus_per_replica"] = self.gpus_per_replica
        return out


@dataclass(frozen=True)
class Autoscale:
    """A model's autoscaling, resolved (the manifest's ``Autoscaling`` with its defaults filled in)."""

    min_replicas: int
    max_replicas: int
    signal: str
    target: float
    """Per replica: waiting requests, KV-cache fraction, or seconds of p95 TTFT (target x SLO)."""
    scale_up_window_seconds: float
    scale_down_delay_seconds: float
    idle_seconds_before_zero: float
    hold_requests: int
    hold_timeout_seconds: float
    cold_start_seconds: float

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))


@dataclass(frozen=True)
class FleetPlan:
    models: list[ReplicaPlan]
    gpus_per_node: int
    router: Router = field(default_factory=Router)
    metrics: Metrics = field(default_factory=Metrics)
    manifest_dir: Path = field(default_factory=Path.cwd)
    """Relative paths in the manifest (an API-key file) are relative to this."""
    tenants: dict[str, Tenant] = field(default_factory=dict)

    @property
    def total_gpus(self) -> int:
        return sum(m.gpus_per_replica * m.replicas for m in self.models)


def _dtype_bytes(m: ResolvedModel) -> int:
    return DTYPE_BYTES.get(m.dtype, 2)


def _estimate(m: ResolvedModel, tp: int, kv_tokens: int, gpu_name: str, prompt_tokens: int) -> Estimate:
    gpu = GPUS[gpu_name]
    b = _dtype_bytes(m)
    s = m.shape
    kv_tok = kv_bytes_per_token(s, b, tp)
    max_batch = max(1, kv_tokens // m.max_model_len)

    def tps(batch: int) -> float:
        params = active_parameter_count(s) if batch == 1 else parameter_count(s)
        step_bytes = params * b / tp + batch * m.max_model_len * kv_tok
        return batch * gpu.bandwidth / step_bytes

    flops = 2 * active_parameter_count(s) * prompt_tokens
    flops += 2 * s.num_layers * s.num_heads * s.head_dim * prompt_tokens**2  # QK^T and PV, causal
    return Estimate(
        decode_tokens_per_s_batch1=tps(1),
        decode_tokens_per_s_max_batch=tps(max_batch),
        max_batch=max_batch,
        prefill_seconds=flops / (tp * gpu.flops_bf16),
        prefill_prompt_tokens=prompt_tokens,
    )


def _sampling_defaults(m: ResolvedModel) -> dict[str, Any]:
    """The model card's defaults; a demo checkpoint takes those of the seed model of its family."""
    if m.catalog is not None:
        return dict(m.catalog.card_sampling)
    if m.demo is not None:
        seed = next((e for e in CATALOG.values() if e.family == m.family.name), None)
        return dict(seed.card_sampling) if seed else {}
    return {}


def plan_model(
    m: ResolvedModel, gpus_per_node: int, gpu_override: str | None = None, prompt_tokens: int = 2048
) -> ReplicaPlan:
    s = m.shape
    b = _dtype_bytes(m)
    params = parameter_count(s)
    weights = params * b
    accel = gpu_override or m.gpu
    spec = m.spec
    auto = None
    replicas = spec.replicas
    if spec.autoscaling is not None:
        a = spec.autoscaling
        target = a.effective_target * (m.ttft_slo_seconds if a.signal == "ttft" else 1.0)
        auto = Autoscale(a.min_replicas, a.max_replicas, a.signal, target, a.scale_up_window_seconds,
                         a.scale_down_delay_seconds, a.idle_seconds_before_zero, a.hold_requests,
                         a.hold_timeout_seconds, a.cold_start_seconds)
        replicas = spec.replicas if "replicas" in spec.model_fields_set else a.min_replicas
    common: dict[str, Any] = dict(
        name=spec.name,
        source=spec.source,
        model_ref=m.model_ref,
        family=m.family.name,
        accelerator=accel,
        dtype=m.dtype,
        replicas=replicas,
        max_model_len=m.max_model_len,
        gpu_memory_utilization=m.gpu_memory_utilization,
        chat_template=m.chat_template,
        parameters=params,
        weight_bytes=weights,
        cpu_kv_cache_gib=m.cpu_kv_cache_gib,
        sampling_defaults=_sampling_defaults(m),
        stop_tokens=m.family.stop_tokens,
        stop_strings=m.family.stop_strings,
        engine_args=dict(spec.engine_args),
        env=dict(spec.env),
        revision=spec.revision,
        demo=m.demo,
        drain_seconds=m.drain_seconds,
        autoscale=auto,
        max_waiting=spec.max_waiting,
    )
    if accel == "cpu":
        tp = spec.tensor_parallel_size or 1
        kv_tok = kv_bytes_per_token(s, b, tp)
        kv_bytes = int(m.cpu_kv_cache_gib * GiB)
        kv_tokens = kv_bytes // kv_tok
        return ReplicaPlan(
            **common,
            tensor_parallel_size=tp,
            weight_bytes_per_gpu=weights // tp,
            kv_bytes_per_token_per_gpu=kv_tok,
            reserve_bytes_per_gpu=0,
            kv_bytes_per_gpu=kv_bytes,
            kv_tokens=kv_tokens,
            full_length_sequences=kv_tokens / m.max_model_len,
            replicas_per_node=1,
            nodes=replicas,
            estimate=None,
        )
    gpu = GPUS[accel]
    budget = gpu.memory_gib * GiB * m.gpu_memory_utilization
    need_tokens = m.max_model_len * m.min_concurrent_sequences

    def kv_room(tp: int) -> int:
        return int(budget - weights / tp - reserve_bytes(s, b, tp))

    candidates = [tp for tp in valid_tp(s) if tp <= gpus_per_node]
    if spec.tensor_parallel_size is not None:
        tp = spec.tensor_parallel_size
        fits = kv_room(tp) >= need_tokens * kv_bytes_per_token(s, b, tp)
        if not fits:
            raise PlanError(_no_fit(m, accel, tp, budget, weights, candidates, need_tokens, kv_room))
        if tp > gpus_per_node:
            raise PlanError(f"{spec.name}: tensor_parallel_size {tp} needs {tp} GPUs on one node; "
                            f"nodes have {gpus_per_node}")
    else:
        fitting = [t for t in candidates if kv_room(t) >= need_tokens * kv_bytes_per_token(s, b, t)]
        if not fitting:
            raise PlanError(_no_fit(m, accel, None, budget, weights, candidates, need_tokens, kv_room))
        tp = fitting[0]
    kv_tok = kv_bytes_per_token(s, b, tp)
    kv_bytes = kv_room(tp)
    kv_tokens = kv_bytes // kv_tok
    per_node = gpus_per_node // tp
    return ReplicaPlan(
        **common,
        tensor_parallel_size=tp,
        weight_bytes_per_gpu=weights // tp,
        kv_bytes_per_token_per_gpu=kv_tok,
        reserve_bytes_per_gpu=reserve_bytes(s, b, tp),
        kv_bytes_per_gpu=kv_bytes,
        kv_tokens=kv_tokens,
        full_length_sequences=kv_tokens / m.max_model_len,
        replicas_per_node=per_node,
        nodes=math.ceil(replicas / per_node) if replicas else 0,
        estimate=_estimate(m, tp, kv_tokens, accel, prompt_tokens),
    )


def _no_fit(m: ResolvedModel, accel: str, tp: int | None, budget: float, weights: int,
            candidates: list[int], need_tokens: int, kv_room: Any) -> str:
    s, b = m.shape, _dtype_bytes(m)
    name = m.spec.source.split("/")[-1]
    util = m.gpu_memory_utilization
    fix = next((t for t in candidates if kv_room(t) >= need_tokens * kv_bytes_per_token(s, b, t)), None)
    head = (f"{name} in {m.dtype} needs {weights / GiB:.1f} GiB of weights"
            + (f" ({weights / tp / GiB:.1f} GiB per GPU at tensor_parallel_size {tp})" if tp and tp > 1 else "")
            + f" and {need_tokens * kv_bytes_per_token(s, b, tp or 1) / GiB:.1f} GiB of KV cache for "
            f"{need_tokens} tokens; one {accel} at {util:.2f} utilisation holds {budget / GiB:.0f} GiB")
    if fix is not None:
        return f"{m.spec.name}: {head}; use tensor_parallel_size {fix}"
    return (f"{m.spec.name}: {head}; no tensor_parallel_size up to {max(candidates, default=1)} fits: "
            f"lower max_model_len ({m.max_model_len}) or min_concurrent_sequences, or use a larger GPU")


def plan_fleet(loaded: LoadedManifest, gpu: str | None = None, gpus_per_node: int | None = None,
               resolved: list[ResolvedModel] | None = None) -> FleetPlan:
    if gpu is not None and gpu != "cpu" and gpu not in GPUS:
        raise PlanError(f"unknown GPU type {gpu!r}; known: {', '.join([*GPUS, 'cpu'])}")
    per_node = gpus_per_node or loaded.manifest.defaults.gpus_per_node
    models = resolved if resolved is not None else resolve(loaded)
    errors: list[str] = []
    plans: list[ReplicaPlan] = []
    for m in models:
        try:
            plans.append(plan_model(m, per_node, gpu))
        except PlanError as exc:
            loc = loaded.location(("models", m.index))
            errors.append(f"{loc}: {exc}")
    errors += _capacity_errors(loaded, plans)
    if errors:
        raise PlanError("\n".join(errors))
    return FleetPlan(models=plans, gpus_per_node=per_node, router=loaded.manifest.router,
                     metrics=loaded.manifest.metrics, manifest_dir=loaded.file.parent,
                     tenants=dict(loaded.manifest.tenants))


def _capacity_errors(loaded: LoadedManifest, plans: list[ReplicaPlan]) -> list[str]:
    """Each accelerator type of ``capacity``: the models on it at ``max_replicas`` must fit."""
    errors = []
    for accel, have in loaded.manifest.capacity.items():
        loc = loaded.location(("capacity", accel))
        if accel not in GPUS:
            near = difflib.get_close_matches(accel, list(GPUS), n=1)
            errors.append(f"{loc}: unknown GPU type {accel!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                                     f"; known: {', '.join(GPUS)}"))
            continue
        on = [p for p in plans if p.accelerator == accel]
        need = sum(p.gpus_per_replica * p.max_replicas for p in on)
        if need > have:
            terms = " + ".join(f"{p.name} {p.max_replicas} x TP{p.tensor_parallel_size}" for p in on)
            worst = max(on, key=lambda p: p.gpus_per_replica * p.max_replicas)
            fit = max(0, (have - need + worst.gpus_per_replica * worst.max_replicas) // worst.gpus_per_replica)
            errors.append(f"{loc}: at max_replicas the models on {accel} need {need} GPUs ({terms}) but capacity "
                          f"is {have}; e.g. {worst.name} fits at most {fit} replica(s) beside the others")
    return errors
