"""Capacity planner: what fits where, decided before anything starts.

Memory per GPU of one replica, at tensor parallel size TP, as vLLM budgets it
(vllm/v1/worker/gpu_worker.py determine_available_memory):

    KV cache = ceil(usable * gpu_memory_utilization) - weights / TP - reserve

* usable: the total CUDA reports for the GPU (gpus.py, from vLLM's own start-up logs), not the
  marketed size: vLLM multiplies that by gpu_memory_utilization;
* weights: every parameter (all experts of an MoE) times the dtype's bytes; a quantized
  checkpoint's linear layers at their own bytes (quant.py); less ``cpu_offload_gb`` per GPU;
* KV cache per token per GPU: 2 (K and V) * layers * KV heads per rank * head_dim * the KV-cache
  dtype's bytes (``kv_cache_dtype``: fp8 is 1 byte), where KV heads per rank = KV heads / TP, or 1
  when TP exceeds the KV heads (vLLM replicates); capacity in whole blocks of 16 tokens;
* reserve: RESERVE_FIXED_GIB for the CUDA context, NCCL buffers and CUDA graphs, plus what vLLM's
  profiling run peaks at: the activations of one scheduler step of ``max_num_batched_tokens``
  tokens (the residual stream, the attention projections and the MLP intermediate of one layer,
  times the routed experts of an MoE) and the float32 logits of ``max_num_seqs`` sequences. Both
  limits are the manifest's ``engine_args`` or vLLM's defaults for the GPU (gpus.py).

On the CPU (gpu: cpu) the KV cache is a fixed VLLM_CPU_KVCACHE_SPACE per rank and only the KV
capacity is planned; vLLM logs the same number at start ("CPU KV cache size: N tokens").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codefleet import moe
from codefleet.catalog import CATALOG
from codefleet.errors import PlanError
from codefleet.gpus import GPUS, Gpu, unknown_gpu_message
from codefleet.manifest import LoadedManifest, Metrics, Router, Tenant
from codefleet.quant import Quant
from codefleet.resolve import ResolvedModel, resolve
from codefleet.shapes import ModelShape

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: vLLM's --kv-cache-dtype values the planner sizes ("auto": the model's dtype).
KV_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1}
RESERVE_FIXED_GIB = 1.0
#: vLLM's KV-cache block (tokens); capacity is a whole number of blocks.
BLOCK_TOKENS = 16
#: Logits are float32 in vLLM's sampler.
LOGIT_BYTES = 4


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


def linear_parameter_count(s: ModelShape) -> int:
    """The weights of the attention and MLP matrices (every expert): what a quantized checkpoint
    stores in fewer bits. Embeddings, the LM head, norms, biases and MoE routers are not."""
    h, kv_dim, q_dim = s.hidden_size, s.num_kv_heads * s.head_dim, s.num_heads * s.head_dim
    mlp = (3 if s.mlp_kind == "gated" else 2) * h * s.intermediate_size
    return s.num_layers * (h * q_dim + 2 * h * kv_dim + q_dim * h + mlp * max(1, s.num_experts))


def weight_bytes(s: ModelShape, dtype_bytes: int, quant: Quant | None = None) -> int:
    params = parameter_count(s)
    if quant is None:
        return params * dtype_bytes
    linear = linear_parameter_count(s)
    return math.ceil(linear * quant.linear_bytes_per_param()) + (params - linear) * dtype_bytes


def kv_heads_per_rank(s: ModelShape, tp: int) -> int:
    return max(1, s.num_kv_heads // tp)


def kv_bytes_per_token(s: ModelShape, dtype_bytes: int, tp: int = 1) -> int:
    """KV-cache bytes per token on each GPU of a replica."""
    return 2 * s.num_layers * kv_heads_per_rank(s, tp) * s.head_dim * dtype_bytes


def activation_bytes(s: ModelShape, dtype_bytes: int, tp: int, batched_tokens: int) -> int:
    """One scheduler step's activations at their peak in vLLM's profiling run."""
    routed = max(1, s.experts_per_token) if s.is_moe else 1
    per_token = (4 * s.hidden_size + 2 * routed * s.intermediate_size // tp) * dtype_bytes
    return batched_tokens * per_token


def sampler_bytes(s: ModelShape, max_num_seqs: int) -> int:
    """The float32 logits of a full batch (vLLM's profiling run samples ``max_num_seqs`` sequences)."""
    return max_num_seqs * s.vocab_size * LOGIT_BYTES


def reserve_bytes(s: ModelShape, dtype_bytes: int, tp: int, batched_tokens: int = 8192,
                  max_num_seqs: int = 256) -> int:
    return (int(RESERVE_FIXED_GIB * GiB) + activation_bytes(s, dtype_bytes, tp, batched_tokens)
            + sampler_bytes(s, max_num_seqs))


def budget_bytes(gpu: Gpu, utilization: float) -> int:
    """What vLLM may use on one GPU: ceil(CUDA's total x gpu_memory_utilization) (vLLM's request_memory)."""
    return math.ceil(gpu.usable_gib * GiB * utilization)


def valid_tp(s: ModelShape, group_size: int | None = None) -> list[int]:
    return s.valid_tensor_parallel_sizes(group_size)


def engine_arg(args: dict[str, Any], name: str) -> Any:
    """An ``engine_args`` value, however the manifest spelt the key (``max-num-seqs``, ``--max_num_seqs``)."""
    for key, value in args.items():
        if key.lstrip("-").replace("-", "_") == name:
            return value
    return None


@dataclass(frozen=True)
class Limits:
    """The engine limits that change memory, each the manifest's or vLLM's default for the GPU."""

    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_dtype: str
    kv_dtype_bytes: int
    cpu_offload_bytes: int
    #: Where each came from (for ``plan --explain``).
    sources: dict[str, str] = field(default_factory=dict)


def engine_limits(m: ResolvedModel, gpu: Gpu) -> Limits:
    args = m.spec.engine_args
    default_tokens, default_seqs = gpu.batch_defaults()
    vllm = f"vLLM's default on {gpu.name}"
    seqs, tokens = engine_arg(args, "max_num_seqs"), engine_arg(args, "max_num_batched_tokens")
    sources = {"max_num_seqs": "engine_args" if seqs else vllm,
               "max_num_batched_tokens": "engine_args" if tokens else vllm}
    if tokens is None:
        tokens = default_tokens
        if engine_arg(args, "enable_chunked_prefill") is False:
            tokens = max(m.max_model_len, default_tokens)  # vLLM: a whole prompt in one step
            sources["max_num_batched_tokens"] += " (no chunked prefill: at least max_model_len)"
    kv_dtype = str(engine_arg(args, "kv_cache_dtype") or "auto")
    if kv_dtype == "auto":
        kv_bytes = _dtype_bytes(m)
    elif kv_dtype in KV_DTYPE_BYTES:
        kv_bytes = KV_DTYPE_BYTES[kv_dtype]
    else:
        raise PlanError(f"{m.spec.name}: engine_args.kv_cache_dtype {kv_dtype!r} is not one the planner sizes; "
                        f"use auto or one of {', '.join(KV_DTYPE_BYTES)}")
    sources["kv_cache_dtype"] = f"{kv_dtype} from engine_args" if kv_dtype != "auto" else f"auto: the model's {m.dtype}"
    offload = float(engine_arg(args, "cpu_offload_gb") or 0)
    return Limits(int(seqs or default_seqs), int(tokens), kv_dtype, kv_bytes, int(offload * GiB), sources)


@dataclass(frozen=True)
class Term:
    """One number of a model's plan, recorded where the plan computes it: ``plan --explain`` shows
    these and recomputes none of them."""

    name: str
    value: float
    unit: str
    """``bytes`` (shown in GiB), ``count`` (thousands grouped), ``int`` (as is) or ``ratio`` (one decimal)."""
    how: str
    """How the number is made and where its inputs come from."""

    @property
    def shown(self) -> str:
        if self.unit == "bytes":
            return f"{self.value / GiB:,.2f} GiB"
        if self.unit == "ratio":
            return f"{self.value:.1f}"
        if self.unit == "int":
            return str(int(self.value))
        return f"{int(self.value):,}"


#: Host CPUs a replica reserves (Ray's bundle, the chart's CPU request): one core for each vLLM
#: process that keeps one busy: the API server (HTTP, tokenizer, detokenizer), the engine core's
#: scheduler loop, and one worker per GPU (each prepares its rank's inputs and spins on the
#: broadcast queue). Fewer and the scheduler and workers share a core, which shows up as time
#: to first token and between tokens; a reservation, not a cap (the chart sets no CPU limit).
HOST_CPUS_BESIDES_WORKERS = 2


def host_cpus(accelerator: str, tp: int) -> int:
    """CPUs one replica reserves on its host; on the CPU (gpu: cpu) each rank computes on its own."""
    return tp if accelerator == "cpu" else HOST_CPUS_BESIDES_WORKERS + tp


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
    #: The engine limits the plan assumed (the manifest's engine_args or vLLM's defaults for the GPU).
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_dtype: str = "auto"
    #: e.g. "awq (4-bit, group 128; ...)"; None: the weights are in ``dtype``.
    quantization: str | None = None
    #: What CUDA reports as the GPU's memory (the base of gpu_memory_utilization), bytes.
    gpu_usable_bytes: int = 0
    #: The fused-MoE kernel config vLLM looks for, and where it was found ("" : nowhere).
    moe_config: str | None = None
    moe_config_found: str = ""
    #: A folder of tuned fused-MoE configs (VLLM_TUNED_CONFIG_FOLDER), from the manifest.
    moe_config_dir: str | None = None
    #: What the plan cannot account for or the operator should act on, said before launch.
    warnings: tuple[str, ...] = ()
    #: Host CPUs one replica reserves (``host_cpus``): Ray's bundle and the chart's CPU request.
    host_cpus: int = 0
    #: The plan's arithmetic, every term with its source, in the order ``plan --explain`` shows it.
    #: (ReplicaPlan stays flat: its numbers above are the same values, set from the same variables.)
    budget: tuple[Term, ...] = ()

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


def _estimate(m: ResolvedModel, tp: int, kv_tokens: int, gpu_name: str, prompt_tokens: int,
              lim: Limits, weights: int) -> Estimate:
    gpu = GPUS[gpu_name]
    s = m.shape
    kv_tok = kv_bytes_per_token(s, lim.kv_dtype_bytes, tp)
    # full-length sequences the KV cache holds, and no more than the engine schedules at once
    max_batch = max(1, min(kv_tokens // m.max_model_len, lim.max_num_seqs))

    params_all = parameter_count(s)

    def tps(batch: int) -> float:
        read = weights * (active_parameter_count(s) / params_all if batch == 1 else 1.0)
        step_bytes = read / tp + batch * m.max_model_len * kv_tok
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
    m: ResolvedModel, gpus_per_node: int, gpu_override: str | None = None, prompt_tokens: int = 2048,
    loaded_dir: Path | None = None,
) -> ReplicaPlan:
    s = m.shape
    b = _dtype_bytes(m)
    params = parameter_count(s)
    weights = weight_bytes(s, b, m.quant)
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
    notes = list(m.warnings)
    if replicas == 0 and auto is None:
        notes.append(f"{spec.name}: replicas is 0: it is listed by /v1/models but answers 503 until `codefleet apply` "
                     f"gives it replicas (for replicas that follow load from zero, use autoscaling with min_replicas 0)")
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
        quantization=m.quant.describe() if m.quant else None,
        moe_config_dir=str(m.moe_config_dir) if m.moe_config_dir else None,
    )
    if accel == "cpu":
        tp = spec.tensor_parallel_size or 1
        cpu_kv_tok = kv_bytes_per_token(s, b, tp)
        kv_bytes = int(m.cpu_kv_cache_gib * GiB)
        kv_tokens = kv_bytes // cpu_kv_tok
        terms = [*_weight_terms(m, params, weights, b),
                 Term("weights per rank", weights // tp, "bytes", f"weights / TP {tp}"),
                 Term("KV cache per rank", kv_bytes, "bytes",
                      f"cpu_kv_cache_gib {m.cpu_kv_cache_gib} (VLLM_CPU_KVCACHE_SPACE)"),
                 Term("KV bytes per token", cpu_kv_tok, "count",
                      f"2 x {s.num_layers} layers x {kv_heads_per_rank(s, tp)} KV heads per rank x "
                      f"head_dim {s.head_dim} x {b} bytes"),
                 Term("KV tokens", kv_tokens, "count", "KV cache / KV bytes per token (vLLM logs 'CPU KV cache size')"),
                 *_tail_terms(m, kv_tokens, None, None),
                 _cpu_term("cpu", tp)]
        return ReplicaPlan(
            **common,
            tensor_parallel_size=tp,
            host_cpus=host_cpus("cpu", tp),
            budget=tuple(terms),
            weight_bytes_per_gpu=weights // tp,
            kv_bytes_per_token_per_gpu=cpu_kv_tok,
            reserve_bytes_per_gpu=0,
            kv_bytes_per_gpu=kv_bytes,
            kv_tokens=kv_tokens,
            full_length_sequences=kv_tokens / m.max_model_len,
            replicas_per_node=1,
            nodes=replicas,
            estimate=None,
            warnings=tuple(notes),
        )
    gpu = GPUS[accel]
    lim = engine_limits(m, gpu)
    group = m.quant.group_size if m.quant else None
    budget = budget_bytes(gpu, m.gpu_memory_utilization)
    need_tokens = m.max_model_len * m.min_concurrent_sequences

    def kv_tok(tp: int) -> int:
        return kv_bytes_per_token(s, lim.kv_dtype_bytes, tp)

    def reserve(tp: int) -> int:
        return reserve_bytes(s, b, tp, lim.max_num_batched_tokens, lim.max_num_seqs)

    def kv_room(tp: int) -> int:
        return int(budget - max(0, weights // tp - lim.cpu_offload_bytes) - reserve(tp))

    candidates = [tp for tp in valid_tp(s, group) if tp <= gpus_per_node]
    if spec.tensor_parallel_size is not None:
        tp = spec.tensor_parallel_size
        fits = kv_room(tp) >= need_tokens * kv_tok(tp)
        if not fits:
            raise PlanError(_no_fit(m, accel, tp, budget, weights, candidates, need_tokens, kv_room, kv_tok))
        if tp > gpus_per_node:
            raise PlanError(f"{spec.name}: tensor_parallel_size {tp} needs {tp} GPUs on one node; "
                            f"nodes have {gpus_per_node}")
    else:
        fitting = [t for t in candidates if kv_room(t) >= need_tokens * kv_tok(t)]
        if not fitting:
            raise PlanError(_no_fit(m, accel, None, budget, weights, candidates, need_tokens, kv_room, kv_tok))
        tp = fitting[0]
    kv_bytes = kv_room(tp)
    kv_tokens = kv_bytes // (kv_tok(tp) * BLOCK_TOKENS) * BLOCK_TOKENS
    per_node = gpus_per_node // tp
    moe_name, moe_found, moe_warning = moe_kernel_config(m, gpu, tp, loaded_dir)
    weights_per_gpu = max(0, weights // tp - lim.cpu_offload_bytes)
    estimate = _estimate(m, tp, kv_tokens, accel, prompt_tokens, lim, weights)
    routed = max(1, s.experts_per_token) if s.is_moe else 1
    offload = f" - cpu_offload_gb {lim.cpu_offload_bytes / GiB:g}" if lim.cpu_offload_bytes else ""
    terms = [
        *_weight_terms(m, params, weights, b),
        Term("usable memory", gpu.usable_gib * GiB, "bytes",
             f"what CUDA reports on {gpu.name} (marketed {gpu.memory_gib:g} GB): {gpu.usable_source}"),
        Term("budget", budget, "bytes",
             f"ceil(usable x gpu_memory_utilization {m.gpu_memory_utilization:.2f}); vLLM's request_memory"),
        Term("weights per GPU", weights_per_gpu, "bytes", f"weights / TP {tp}{offload}"),
        Term("fixed reserve", RESERVE_FIXED_GIB * GiB, "bytes",
             "CUDA context, NCCL buffers, CUDA graphs (RESERVE_FIXED_GIB)"),
        Term("activations", activation_bytes(s, b, tp, lim.max_num_batched_tokens), "bytes",
             f"max_num_batched_tokens {lim.max_num_batched_tokens} ({lim.sources['max_num_batched_tokens']}) x "
             f"(4 x hidden {s.hidden_size} + 2 x {routed} x MLP width {s.intermediate_size} / TP {tp}) x {b} bytes"),
        Term("sampler logits", sampler_bytes(s, lim.max_num_seqs), "bytes",
             f"max_num_seqs {lim.max_num_seqs} ({lim.sources['max_num_seqs']}) x vocab {s.vocab_size} x "
             f"{LOGIT_BYTES} bytes (float32)"),
        Term("KV cache", kv_bytes, "bytes", "budget - weights per GPU - reserve (fixed + activations + logits)"),
        Term("KV bytes per token", kv_tok(tp), "count",
             f"2 x {s.num_layers} layers x {kv_heads_per_rank(s, tp)} KV heads per rank x head_dim {s.head_dim} x "
             f"{lim.kv_dtype_bytes} bytes (kv_cache_dtype {lim.sources['kv_cache_dtype']})"),
        Term("KV tokens", kv_tokens, "count",
             f"floor(KV cache / (KV bytes per token x {BLOCK_TOKENS})) x {BLOCK_TOKENS}: whole blocks"),
        Term("TP choice", tp, "int",
             f"the smallest of {', '.join(map(str, valid_tp(s, group)))} that leaves KV room for max_model_len "
             f"{m.max_model_len} x min_concurrent_sequences {m.min_concurrent_sequences}"
             if spec.tensor_parallel_size is None else "set in the manifest"),
        *_tail_terms(m, kv_tokens, estimate, lim.max_num_seqs),
        _cpu_term(accel, tp),
    ]
    return ReplicaPlan(
        **common,
        tensor_parallel_size=tp,
        host_cpus=host_cpus(accel, tp),
        budget=tuple(terms),
        weight_bytes_per_gpu=weights_per_gpu,
        kv_bytes_per_token_per_gpu=kv_tok(tp),
        reserve_bytes_per_gpu=reserve(tp),
        kv_bytes_per_gpu=kv_bytes,
        kv_tokens=kv_tokens,
        full_length_sequences=kv_tokens / m.max_model_len,
        replicas_per_node=per_node,
        nodes=math.ceil(replicas / per_node) if replicas else 0,
        estimate=estimate,
        max_num_seqs=lim.max_num_seqs,
        max_num_batched_tokens=lim.max_num_batched_tokens,
        kv_cache_dtype=lim.kv_cache_dtype,
        gpu_usable_bytes=int(gpu.usable_gib * GiB),
        moe_config=moe_name,
        moe_config_found=moe_found,
        warnings=(*notes, *([moe_warning] if moe_warning else [])),
    )


def _weight_terms(m: ResolvedModel, params: int, weights: int, b: int) -> list[Term]:
    s = m.shape
    out = [Term("parameters", params, "count", "layers x (attention + MLP + norms) + embeddings (+ LM head unless "
                                               "tied); planner.parameter_count")]
    if m.quant:
        linear = linear_parameter_count(s)
        out.append(Term("weights", weights, "bytes",
                        f"linear {linear:,} x {m.quant.linear_bytes_per_param():.4f} bytes ({m.quant.describe()}, "
                        f"from {m.quant.source}) + the other {params - linear:,} x {b} bytes ({m.dtype})"))
    else:
        out.append(Term("weights", weights, "bytes", f"parameters x {b} bytes ({m.dtype})"))
    return out


def _tail_terms(m: ResolvedModel, kv_tokens: int, estimate: Estimate | None, max_num_seqs: int | None) -> list[Term]:
    out = [Term("full-length seqs", kv_tokens / m.max_model_len, "ratio", f"KV tokens / max_model_len {m.max_model_len}")]
    if estimate:
        out.append(Term("batch ceiling", estimate.max_batch, "int",
                        f"min(full-length seqs, max_num_seqs {max_num_seqs})"))
    return out


def _cpu_term(accel: str, tp: int) -> Term:
    how = (f"TP {tp}: the ranks compute on the host" if accel == "cpu" else
           f"{HOST_CPUS_BESIDES_WORKERS} (API server, engine core) + TP {tp} (one per GPU worker)")
    return Term("host CPUs", host_cpus(accel, tp), "int", how + "; Ray's bundle and the chart's CPU request")


def moe_kernel_config(m: ResolvedModel, gpu: Gpu, tp: int, manifest_dir: Path | None) -> tuple[
        str | None, str, str | None]:
    """(the config file vLLM's fused-MoE kernel looks for, where it was found, a warning if nowhere)."""
    s = m.shape
    if not s.is_moe:
        return None, "", None
    dtype = moe.config_dtype(m.dtype, m.quant.method if m.quant else None)
    if dtype is False:
        return None, "", None
    name = moe.config_file_name(s.num_experts, s.intermediate_size // tp, gpu.moe_device_name,
                                dtype if isinstance(dtype, str) else None)
    if m.moe_config_dir is not None and (m.moe_config_dir / name).is_file():
        return name, str(m.moe_config_dir), None
    shipped = moe.shipped_configs_dir()
    if shipped is not None and (shipped / name).is_file():
        return name, "shipped with vLLM", None
    where = "vLLM (not installed here) may ship" if shipped is None else "vLLM ships no"
    own = f" nor does {m.moe_config_dir}" if m.moe_config_dir else ""
    return name, "", (
        f"{m.spec.name}: {where} tuned fused-MoE config {name} for {gpu.name}{own}; the engine will log "
        f"'Using default MoE config' and run its MoE layers markedly slower (vLLM #17619, #17768). Tune one "
        f"there: {moe.tune_command(m.model_ref, tp, dtype == 'fp8_w8a8')}, then set moe_config_dir to its folder")


def _no_fit(m: ResolvedModel, accel: str, tp: int | None, budget: float, weights: int,
            candidates: list[int], need_tokens: int, kv_room: Any, kv_tok: Any) -> str:
    name = m.spec.source.split("/")[-1]
    util = m.gpu_memory_utilization
    fix = next((t for t in candidates if kv_room(t) >= need_tokens * kv_tok(t)), None)
    head = (f"{name} in {m.dtype} needs {weights / GiB:.1f} GiB of weights"
            + (f" ({weights / tp / GiB:.1f} GiB per GPU at tensor_parallel_size {tp})" if tp and tp > 1 else "")
            + f" and {need_tokens * kv_tok(tp or 1) / GiB:.1f} GiB of KV cache for "
            f"{need_tokens} tokens; one {accel} at {util:.2f} utilisation holds {budget / GiB:.1f} GiB "
            f"(of the {GPUS[accel].usable_gib:.2f} GiB CUDA reports)")
    if fix is not None:
        return f"{m.spec.name}: {head}; use tensor_parallel_size {fix}"
    return (f"{m.spec.name}: {head}; no tensor_parallel_size up to {max(candidates, default=1)} fits: "
            f"lower max_model_len ({m.max_model_len}) or min_concurrent_sequences, or use a larger GPU")


def plan_fleet(loaded: LoadedManifest, gpu: str | None = None, gpus_per_node: int | None = None,
               resolved: list[ResolvedModel] | None = None) -> FleetPlan:
    if gpu is not None and gpu != "cpu" and gpu not in GPUS:
        raise PlanError(unknown_gpu_message(gpu, "--gpu: "))
    per_node = gpus_per_node or loaded.manifest.defaults.gpus_per_node
    models = resolved if resolved is not None else resolve(loaded)
    errors: list[str] = []
    plans: list[ReplicaPlan] = []
    for m in models:
        try:
            plans.append(plan_model(m, per_node, gpu, loaded_dir=loaded.file.parent))
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
            errors.append(f"{loc}: {unknown_gpu_message(accel)}")
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


def explain(m: ResolvedModel, p: ReplicaPlan) -> str:
    """The whole arithmetic of one model's plan, every term with its source (``plan --explain``):
    the terms the plan recorded (``ReplicaPlan.budget``), none computed again here."""
    s = m.shape
    where = "catalog" if m.catalog else ("demo checkpoint" if m.demo else "config.json")
    head = [f"{p.name} on {p.accelerator}: tensor_parallel_size {p.tensor_parallel_size}, {p.replicas} replica(s)",
            f"shape ({where}: {p.source}): hidden {s.hidden_size}, {s.num_layers} layers, {s.num_heads} heads / "
            f"{s.num_kv_heads} KV heads, head_dim {s.head_dim}, MLP width {s.intermediate_size}"
            + (f" x {s.num_experts} experts ({s.experts_per_token} routed)" if s.is_moe else "")
            + f", vocab {s.vocab_size}"]
    rows = [(t.name, t.shown, t.how) for t in p.budget]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines = head + [f"  {n:<{width}}  {v:>{vwidth}}  {h}" for n, v, h in rows]
    if p.moe_config:
        lines.append(f"fused-MoE kernel config {p.moe_config}: "
                     + (f"found ({p.moe_config_found})" if p.moe_config_found else "not found (see the warning)"))
    lines += [f"warning: {w}" for w in p.warnings]
    return "\n".join(lines)
