"""``plan --explain``: the budget terms a plan records (``ReplicaPlan.budget``) and their rendering."""

from __future__ import annotations

from codefleet.plans import Estimate, ReplicaPlan, Term
from codefleet.resolve import ResolvedModel
from codefleet.sizing import HOST_CPUS_BESIDES_WORKERS, host_cpus, linear_parameter_count


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
