"""``plan --explain``: the budget terms a plan records (``ReplicaPlan.budget``) and their rendering."""

from __future__ import annotations

from codefleet.limits import dtype_bytes, engine_arg
from codefleet.lora import lora_slot_bytes
from codefleet.plans import EngineLimits, Estimate, ReplicaPlan, Term
from codefleet.resolve import ResolvedModel
from codefleet.sizing import HOST_CPUS_BESIDES_WORKERS, host_cpus, linear_parameter_count
from codefleet.speculative import ngram_warmup_bytes, step_tokens


def weight_terms(m: ResolvedModel, params: int, weights: int, b: int) -> list[Term]:
    s = m.shape
    out = [Term("parameters", params, "count", "layers x (attention + MLP + norms) + embeddings (+ LM head unless "
                                               "tied); sizing.parameter_count")]
    if m.quant:
        linear = linear_parameter_count(s)
        out.append(Term("weights", weights, "bytes",
                        f"linear {linear:,} x {m.quant.linear_bytes_per_param():.4f} bytes ({m.quant.describe()}, "
                        f"from {m.quant.source}) + the other {params - linear:,} x {b} bytes ({m.dtype})"))
    else:
        out.append(Term("weights", weights, "bytes", f"parameters x {b} bytes ({m.dtype})"))
    return out


def tail_terms(m: ResolvedModel, kv_tokens: int, estimate: Estimate | None, max_num_seqs: int | None) -> list[Term]:
    out = [Term("full-length seqs", kv_tokens / m.max_model_len, "ratio", f"KV tokens / max_model_len {m.max_model_len}")]
    if estimate:
        out.append(Term("batch ceiling", estimate.max_batch, "int",
                        f"min(full-length seqs, max_num_seqs {max_num_seqs})"))
    return out


def cpu_term(accel: str, tp: int) -> Term:
    how = (f"TP {tp}: the ranks compute on the host" if accel == "cpu" else
           f"{HOST_CPUS_BESIDES_WORKERS} (API server, engine core) + TP {tp} (one per GPU worker)")
    return Term("host CPUs", host_cpus(accel, tp), "int", how + "; Ray's bundle and the chart's CPU request")

def explain(m: ResolvedModel, p: ReplicaPlan) -> str:
    """The whole arithmetic of one model's plan, every term with its source (``plan --explain``):
    the terms the plan recorded (``ReplicaPlan.budget``), none computed again here."""
    s = m.shape
    where = "catalog" if m.catalog else ("demo checkpoint" if m.demo else "config.json")
    at = p.placement
    head = [f"{p.name} on {at.accelerator}: tensor_parallel_size {at.tensor_parallel_size}, {at.replicas} replica(s)",
            f"shape ({where}: {p.source}): hidden {s.hidden_size}, {s.num_layers} layers, {s.num_heads} heads / "
            f"{s.num_kv_heads} KV heads, head_dim {s.head_dim}, MLP width {s.intermediate_size}"
            + (f" x {s.num_experts} experts ({s.experts_per_token} routed)" if s.is_moe else "")
            + f", vocab {s.vocab_size}"]
    rows = [(t.name, t.shown, t.how) for t in p.budget]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines = head + [f"  {n:<{width}}  {v:>{vwidth}}  {h}" for n, v, h in rows]
    if p.moe.config:
        lines.append(f"fused-MoE kernel config {p.moe.config}: "
                     + (f"found ({p.moe.found})" if p.moe.found else "not found (see the warning)"))
    lines += [f"warning: {w}" for w in p.warnings]
    return "\n".join(lines)


#: vLLM 0.32's CPU defaults for the OpenAI server per rank (vllm/engine/arg_utils.py).
CPU_BATCH_DEFAULTS = (128, 2048)


def _batch(m: ResolvedModel, engine: EngineLimits) -> tuple[int, int]:
    seqs, tokens = engine.max_num_seqs, engine.max_num_batched_tokens
    if seqs is None or tokens is None:
        tp = m.spec.tensor_parallel_size or 1
        seqs = int(engine_arg(m.spec.engine_args, "max_num_seqs") or CPU_BATCH_DEFAULTS[0] * tp)
        tokens = int(engine_arg(m.spec.engine_args, "max_num_batched_tokens") or CPU_BATCH_DEFAULTS[1] * tp)
    return seqs, tokens


def speculative_terms(m: ResolvedModel, engine: EngineLimits) -> tuple[Term, ...]:
    """What speculation adds to a plan. ngram and suffix load no draft weights and no draft KV pool
    (vLLM reserves lookahead slots only for draft models, EAGLE and DFlash: vllm/config/vllm.py), so
    the KV budget is unchanged; a step's draft tokens take slots of the same pool while they are
    verified, and part of the step's token budget."""
    sp = m.speculative
    if sp is None or not sp.on:
        return ()
    seqs, tokens = _batch(m, engine)
    out = [Term("speculative", sp.tokens, "int",
                f"{sp.method}: draft tokens per step at most ({sp.describe()}); no draft weights, no extra KV pool"),
           Term("tokens per decode step", step_tokens(seqs, sp.tokens), "count",
                f"max_num_seqs {seqs} x (1 + {sp.tokens} draft tokens), out of max_num_batched_tokens {tokens}")]
    if sp.method == "ngram":
        out.append(Term("ngram warm-up (host)", ngram_warmup_bytes(m.max_model_len), "bytes",
                        f"once at start: 1024 x max_model_len {m.max_model_len} x 4 bytes (numba JIT warm-up)"))
    return tuple(out)


def speculative_warnings(m: ResolvedModel, engine: EngineLimits) -> tuple[str, ...]:
    sp = m.speculative
    if sp is None or not sp.on:
        return ()
    seqs, tokens = _batch(m, engine)
    if step_tokens(seqs, sp.tokens) <= tokens:
        return ()
    return (f"{m.spec.name}: with all max_num_seqs {seqs} sequences decoding, full drafts of {sp.tokens} tokens need "
            f"{step_tokens(seqs, sp.tokens):,} tokens per step, above max_num_batched_tokens {tokens:,}: at that load "
            f"vLLM schedules fewer sequences per step or shorter drafts (speculation pays least there anyway)",)


def lora_bytes(m: ResolvedModel, tp: int) -> int:
    """What vLLM pre-allocates for the model's LoRA slots on one GPU (0 without LoRA)."""
    if m.lora is None:
        return 0
    return m.lora.max_loras * lora_slot_bytes(m.shape, m.lora.max_lora_rank, dtype_bytes(m), tp)


def lora_terms(m: ResolvedModel, tp: int, cpu: bool = False) -> tuple[Term, ...]:
    """The LoRA slots' term (vllm/lora/layers/*: every wrapped layer holds max_loras x A and B at
    max_lora_rank), and the adapters, in ``plan --explain``."""
    lo = m.lora
    if lo is None:
        return ()
    where = ("host memory on top of the KV cache (the CPU engine subtracts nothing)" if cpu
             else "taken before the KV cache is sized")
    return (Term("LoRA slots", lora_bytes(m, tp), "bytes",
                 f"max_loras {lo.max_loras} x max_lora_rank {lo.max_lora_rank} x {dtype_bytes(m)} bytes x (A and B of "
                 f"every linear layer, embed_tokens, lm_head; per GPU at TP {tp}); {where}"),
            Term("adapters", len(lo.adapters), "int",
                 ", ".join(f"{a.name} (r {a.rank if a.rank is not None else '?'})" for a in lo.adapters)
                 or "none yet (codefleet apply adds them)"))
