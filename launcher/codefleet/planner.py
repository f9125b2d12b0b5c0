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

import dataclasses
import math
from pathlib import Path
from typing import Any

from codefleet import moe
from codefleet.errors import PlanError
from codefleet.explain import (
    cpu_term,
    lora_bytes,
    lora_terms,
    speculative_terms,
    speculative_warnings,
    tail_terms,
    weight_terms,
)
from codefleet.gpus import GPUS, Gpu, unknown_gpu_message
from codefleet.limits import Limits, dtype_bytes, engine_limits
from codefleet.manifest import LoadedManifest
from codefleet.plans import (
    Autoscale,
    EngineLimits,
    Estimate,
    FleetPlan,
    Generation,
    Memory,
    MoeKernel,
    Placement,
    ReplicaPlan,
    Term,
)
from codefleet.resolve import ResolvedModel, catalog_seed, resolve
from codefleet.sizing import (
    BLOCK_TOKENS,
    LOGIT_BYTES,
    RESERVE_FIXED_GIB,
    GiB,
    activation_bytes,
    active_parameter_count,
    budget_bytes,
    host_cpus,
    kv_bytes_per_token,
    kv_heads_per_rank,
    parameter_count,
    reserve_bytes,
    sampler_bytes,
    valid_tp,
    weight_bytes,
)


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
    seed = catalog_seed(m.catalog, m.demo, m.family.name)
    return dict(seed.card_sampling) if seed else {}


def plan_model(
    m: ResolvedModel, gpus_per_node: int, gpu_override: str | None = None, prompt_tokens: int = 2048,
    loaded_dir: Path | None = None,
) -> ReplicaPlan:
    s = m.shape
    b = dtype_bytes(m)
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
    generation = Generation(chat_template=m.chat_template, sampling_defaults=_sampling_defaults(m),
                            stop_tokens=m.family.stop_tokens, stop_strings=m.family.stop_strings, fim=m.fim)

    def replica_plan(placement: Placement, memory: Memory, engine: EngineLimits, moe_kernel: MoeKernel,
                     estimate: Estimate | None, terms: list[Term], warnings: list[str]) -> ReplicaPlan:
        return ReplicaPlan(
            name=spec.name, source=spec.source, model_ref=m.model_ref, family=m.family.name, placement=placement,
            memory=memory, engine=engine, generation=generation, moe=moe_kernel, estimate=estimate,
            engine_args=dict(spec.engine_args), env=dict(spec.env), revision=spec.revision, demo=m.demo,
            drain_seconds=m.drain_seconds, autoscale=auto, max_waiting=spec.max_waiting,
            warnings=tuple(warnings) + speculative_warnings(m, engine), budget=tuple(terms) + speculative_terms(m, engine),
            speculative=m.speculative.vllm_config() if m.speculative else None, lora=m.lora)

    quantization = m.quant.describe() if m.quant else None
    moe_dir = str(m.moe_config_dir) if m.moe_config_dir else None
    if accel == "cpu":
        tp = spec.tensor_parallel_size or 1
        cpu_kv_tok = kv_bytes_per_token(s, b, tp)
        kv_bytes = int(m.cpu_kv_cache_gib * GiB)
        kv_tokens = kv_bytes // cpu_kv_tok
        terms = [*weight_terms(m, params, weights, b),
                 Term("weights per rank", weights // tp, "bytes", f"weights / TP {tp}"),
                 Term("KV cache per rank", kv_bytes, "bytes",
                      f"cpu_kv_cache_gib {m.cpu_kv_cache_gib} (VLLM_CPU_KVCACHE_SPACE)"),
                 Term("KV bytes per token", cpu_kv_tok, "count",
                      f"2 x {s.num_layers} layers x {kv_heads_per_rank(s, tp)} KV heads per rank x "
                      f"head_dim {s.head_dim} x {b} bytes"),
                 Term("KV tokens", kv_tokens, "count", "KV cache / KV bytes per token (vLLM logs 'CPU KV cache size')"),
                 *lora_terms(m, tp, cpu=True),
                 *tail_terms(m, kv_tokens, None, None),
                 cpu_term("cpu", tp)]
        return replica_plan(
            Placement(accelerator=accel, tensor_parallel_size=tp, replicas=replicas, replicas_per_node=1,
                      nodes=replicas, host_cpus=host_cpus("cpu", tp)),
            Memory(parameters=params, weight_bytes=weights, weight_bytes_per_gpu=weights // tp,
                   kv_bytes_per_token_per_gpu=cpu_kv_tok, reserve_bytes_per_gpu=0, kv_bytes_per_gpu=kv_bytes,
                   kv_tokens=kv_tokens, full_length_sequences=kv_tokens / m.max_model_len,
                   cpu_kv_cache_gib=m.cpu_kv_cache_gib),
            EngineLimits(dtype=m.dtype, max_model_len=m.max_model_len, gpu_memory_utilization=m.gpu_memory_utilization,
                         quantization=quantization),
            MoeKernel(config_dir=moe_dir), estimate=None, terms=terms, warnings=notes)
    gpu = GPUS[accel]
    lim = engine_limits(m, gpu)
    group = m.quant.group_size if m.quant else None
    budget = budget_bytes(gpu, m.gpu_memory_utilization)
    need_tokens = m.max_model_len * m.min_concurrent_sequences

    def kv_tok(tp: int) -> int:
        return kv_bytes_per_token(s, lim.kv_dtype_bytes, tp)

    def reserve(tp: int) -> int:
        return reserve_bytes(s, b, tp, lim.max_num_batched_tokens, lim.max_num_seqs) + lora_bytes(m, tp)

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
        *weight_terms(m, params, weights, b),
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
        *lora_terms(m, tp),
        Term("KV cache", kv_bytes, "bytes", "budget - weights per GPU - reserve (fixed + activations + logits"
             + (" + LoRA slots)" if m.lora else ")")),
        Term("KV bytes per token", kv_tok(tp), "count",
             f"2 x {s.num_layers} layers x {kv_heads_per_rank(s, tp)} KV heads per rank x head_dim {s.head_dim} x "
             f"{lim.kv_dtype_bytes} bytes (kv_cache_dtype {lim.sources['kv_cache_dtype']})"),
        Term("KV tokens", kv_tokens, "count",
             f"floor(KV cache / (KV bytes per token x {BLOCK_TOKENS})) x {BLOCK_TOKENS}: whole blocks"),
        Term("TP choice", tp, "int",
             f"the smallest of {', '.join(map(str, valid_tp(s, group)))} that leaves KV room for max_model_len "
             f"{m.max_model_len} x min_concurrent_sequences {m.min_concurrent_sequences}"
             if spec.tensor_parallel_size is None else "set in the manifest"),
        *tail_terms(m, kv_tokens, estimate, lim.max_num_seqs),
        cpu_term(accel, tp),
    ]
    return replica_plan(
        Placement(accelerator=accel, tensor_parallel_size=tp, replicas=replicas, replicas_per_node=per_node,
                  nodes=math.ceil(replicas / per_node) if replicas else 0, host_cpus=host_cpus(accel, tp)),
        Memory(parameters=params, weight_bytes=weights, weight_bytes_per_gpu=weights_per_gpu,
               kv_bytes_per_token_per_gpu=kv_tok(tp), reserve_bytes_per_gpu=reserve(tp), kv_bytes_per_gpu=kv_bytes,
               kv_tokens=kv_tokens, full_length_sequences=kv_tokens / m.max_model_len,
               gpu_usable_bytes=int(gpu.usable_gib * GiB), cpu_kv_cache_gib=m.cpu_kv_cache_gib),
        EngineLimits(dtype=m.dtype, max_model_len=m.max_model_len, gpu_memory_utilization=m.gpu_memory_utilization,
                     max_num_seqs=lim.max_num_seqs, max_num_batched_tokens=lim.max_num_batched_tokens,
                     kv_cache_dtype=lim.kv_cache_dtype, quantization=quantization),
        MoeKernel(config=moe_name, found=moe_found, config_dir=moe_dir),
        estimate=estimate, terms=terms, warnings=[*notes, *([moe_warning] if moe_warning else [])])


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
            + f" and {need_tokens * kv_tok(tp or 1) / GiB:.1f} GiB of KV cache for {need_tokens} tokens"
            + (f" beside {lora_bytes(m, tp or 1) / GiB:.1f} GiB of LoRA slots (max_loras {m.lora.max_loras} x "
               f"max_lora_rank {m.lora.max_lora_rank})" if m.lora else "")
            + f"; one {accel} at {util:.2f} utilisation holds {budget / GiB:.1f} GiB "
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
    if loaded.manifest.router.policy == "cache_aware":  # the router needs the prompts' token ids
        plans = [dataclasses.replace(p, render_endpoints=True) for p in plans]
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
        on = [p for p in plans if p.placement.accelerator == accel]
        need = sum(p.placement.gpus_per_replica * p.max_replicas for p in on)
        if need > have:
            terms = " + ".join(f"{p.name} {p.max_replicas} x TP{p.placement.tensor_parallel_size}" for p in on)
            worst = max(on, key=lambda p: p.placement.gpus_per_replica * p.max_replicas)
            per = worst.placement.gpus_per_replica
            fit = max(0, (have - need + per * worst.max_replicas) // per)
            errors.append(f"{loc}: at max_replicas the models on {accel} need {need} GPUs ({terms}) but capacity "
                          f"is {have}; e.g. {worst.name} fits at most {fit} replica(s) beside the others")
    return errors


