"""``codefleet validate`` and ``codefleet plan``: a manifest planned, and the plan printed."""

from __future__ import annotations

import argparse
import json

from codefleet.errors import CodefleetError
from codefleet.manifest import load
from codefleet.planner import plan_fleet
from codefleet.plans import FleetPlan, ReplicaPlan
from codefleet.sizing import GiB


def plan_from_args(args: argparse.Namespace) -> FleetPlan:
    loaded = load(args.manifest)
    return plan_fleet(loaded, gpu=getattr(args, "gpu", None), gpus_per_node=getattr(args, "gpus_per_node", None))


def cmd_validate(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    print(f"{args.manifest}: valid; {len(plan.models)} models, "
          f"{sum(m.placement.replicas for m in plan.models)} replicas")
    return 0


def replicas(m: ReplicaPlan) -> str:
    return f"{m.autoscale.min_replicas}-{m.autoscale.max_replicas}" if m.autoscale else str(m.placement.replicas)


def format_plan(plan: FleetPlan) -> str:
    head = (f"{'model':<34} {'gpu':<10} {'TP':>2} {'repl':>5} {'max_len':>7} {'wGiB/gpu':>8} "
            f"{'kvGiB/gpu':>9} {'KV tokens':>10} {'full seqs':>9} {'drain s':>7} {'decode tok/s b1|bmax (est.)':>28}")
    rows = [head, "-" * len(head)]
    for m in plan.models:
        est = m.estimate
        tps = (f"{est.decode_tokens_per_s_batch1:,.0f} | {est.decode_tokens_per_s_max_batch:,.0f} (b={est.max_batch})"
               if est else "n/a on cpu")
        at, mem = m.placement, m.memory
        rows.append(
            f"{m.name:<34} {at.accelerator:<10} {at.tensor_parallel_size:>2} {replicas(m):>5} {m.engine.max_model_len:>7} "
            f"{mem.weight_bytes_per_gpu / GiB:>8.2f} {mem.kv_bytes_per_gpu / GiB:>9.2f} {mem.kv_tokens:>10,} "
            f"{mem.full_length_sequences:>9.1f} {m.drain_seconds:>7} {tps:>28}"
        )
    at_max = sum(m.placement.gpus_per_replica * m.max_replicas for m in plan.models)
    rows.append(f"GPUs: {plan.total_gpus} ({plan.gpus_per_node} per node)"
                + (f", {at_max} at max_replicas" if at_max != plan.total_gpus else "")
                + ". Decode figures are roofline upper bounds from memory bandwidth, full-length sequences.")
    if any(m.autoscale for m in plan.models):
        rows.append("repl: autoscaled models show min-max (start at the first number unless `replicas` is set).")
    for m in plan.models:
        if m.placement.accelerator != "cpu":
            e = m.engine
            extra = [f"kv cache {e.kv_cache_dtype}"] if e.kv_cache_dtype != "auto" else []
            extra += [f"weights {e.quantization}"] if e.quantization else []
            rows.append(f"  {m.name}: max_num_seqs {e.max_num_seqs}, max_num_batched_tokens {e.max_num_batched_tokens}"
                        + "".join(f", {e}" for e in extra))
    rows.append("fill in the middle (suffix on /v1/completions; format, or no): "
                + ", ".join(f"{m.name} {m.generation.fim or 'no'}" for m in plan.models))
    speculating = [m for m in plan.models if m.speculative]
    if speculating:
        rows.append("speculative decoding (docs/speculative.md): " + "; ".join(
            f"{m.name} {m.speculative['method']} k{m.speculative['num_speculative_tokens']}" for m in speculating
            if m.speculative))
    with_lora = [(m.name, m.lora) for m in plan.models if m.lora]
    if with_lora:
        rows.append("LoRA adapters (docs/lora.md): " + "; ".join(
            f"{name} {', '.join(a.name for a in lo.adapters) or 'none yet'} (max_loras {lo.max_loras}, "
            f"max_lora_rank {lo.max_lora_rank})" for name, lo in with_lora))
    rows += [f"warning: {w}" for m in plan.models for w in m.warnings]
    return "\n".join(rows)


def cmd_plan(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    if args.explain:
        from codefleet.explain import explain
        from codefleet.resolve import resolve

        names = [m.name for m in plan.models]
        if args.explain not in names:
            raise CodefleetError(f"--explain {args.explain!r}: no such model in {args.manifest}; its models: "
                                 f"{', '.join(names)}")
        resolved = next(r for r in resolve(load(args.manifest)) if r.spec.name == args.explain)
        print(explain(resolved, next(m for m in plan.models if m.name == args.explain)))
        return 0
    if args.json:
        print(json.dumps({"gpus_per_node": plan.gpus_per_node, "total_gpus": plan.total_gpus,
                          "models": [m.to_json() for m in plan.models]}, indent=2))
    else:
        print(format_plan(plan))
    return 0
