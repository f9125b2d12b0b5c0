"""``codefleet status``: per model, ready replicas and live figures read from each engine's /metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from codefleet.gateway.metrics import (
    MIGRATIONS,
    TENANT_COMPLETION_TOKENS,
    TENANT_PROMPT_TOKENS,
    TENANT_REJECTIONS,
    TENANT_REQUESTS,
    total,
)
from codefleet.runtime.state import AutoscaleRange, FleetState, LastDecision


@dataclass
class ReplicaStatus:
    index: int
    url: str
    ready: bool
    figures: dict[str, float] = field(default_factory=dict)
    node: str = ""
    """Ray runtime: the node (IP and id prefix) the replica runs on."""
    state: str = ""
    """The runtime's view: starting, ready, draining."""
    adapters: tuple[str, ...] = ()
    """LoRA adapters loaded on it and routed to it."""


@dataclass
class ModelStatus:
    name: str
    replicas: list[ReplicaStatus] = field(default_factory=list)
    desired: int | None = None
    drain_seconds: int | None = None
    autoscale: AutoscaleRange | None = None
    """When the model autoscales."""
    last_decision: LastDecision | None = None
    migrations: dict[str, float] = field(default_factory=dict)
    """Requests whose replica failed, by outcome (the gateway's codefleet_gateway_migrations_total)."""

    @property
    def ready(self) -> int:
        return sum(r.ready for r in self.replicas)

    def total(self, key: str) -> float | None:
        vals = [r.figures[key] for r in self.replicas if key in r.figures]
        if not vals:
            return None
        return max(vals) if key == "kv_usage" else sum(vals)


TTFT_BUCKET = "vllm:time_to_first_token_seconds_bucket"


@dataclass
class EngineLook:
    """One engine's /metrics as codefleet reads it (status, drain, autoscaler, overload shedding).
    A figure the engine does not export is None."""

    running: float | None = None
    waiting: float | None = None
    kv: float | None = None
    """The fullest rank's KV-cache usage (0-1)."""
    finished: float | None = None
    """Requests finished so far (vllm:request_success_total, every reason)."""
    ttft_buckets: dict[float, float] = field(default_factory=dict)
    """Cumulative counts of the TTFT histogram by upper bound."""
    prefix_hits: float | None = None
    """Prompt tokens found in the prefix cache so far (vllm:prefix_cache_hits_total)."""
    prefix_queries: float | None = None
    """Prompt tokens looked up in it (vllm:prefix_cache_queries_total)."""
    spec_accepted: float | None = None
    """Draft tokens accepted so far (vllm:spec_decode_num_accepted_tokens_total; only a speculating engine)."""
    spec_draft_tokens: float | None = None
    """Draft tokens proposed (vllm:spec_decode_num_draft_tokens_total)."""
    spec_drafts: float | None = None
    """Steps that carried a draft (vllm:spec_decode_num_drafts_total)."""


def _add(a: float | None, b: float) -> float:
    return b if a is None else a + b


#: vLLM's series summed over their label sets, and the EngineLook field each goes to.
SUMMED = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
          "vllm:request_success_total": "finished", "vllm:prefix_cache_hits_total": "prefix_hits",
          "vllm:prefix_cache_queries_total": "prefix_queries",
          "vllm:spec_decode_num_accepted_tokens_total": "spec_accepted",
          "vllm:spec_decode_num_draft_tokens_total": "spec_draft_tokens",
          "vllm:spec_decode_num_drafts_total": "spec_drafts"}


def engine_look(text: str) -> EngineLook:
    """One engine's Prometheus text, summed over label sets (engine ranks, finish reasons)."""
    look = EngineLook()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (attr := SUMMED.get(s.name)) is not None:
                setattr(look, attr, _add(getattr(look, attr), s.value))
            elif s.name == "vllm:kv_cache_usage_perc":
                look.kv = s.value if look.kv is None else max(look.kv, s.value)
            elif s.name == TTFT_BUCKET:
                le = float(s.labels["le"])
                look.ttft_buckets[le] = look.ttft_buckets.get(le, 0.0) + s.value
    return look


def engine_figures(text: str) -> dict[str, float]:
    """The columns of `status` for one engine (only those it exports): running, waiting, kv_usage;
    summed over a model's replicas, except KV usage (the fullest replica)."""
    look = engine_look(text)
    out = {"running": look.running, "waiting": look.waiting, "kv_usage": look.kv,
           "spec_accepted": look.spec_accepted, "spec_draft_tokens": look.spec_draft_tokens,
           "spec_drafts": look.spec_drafts}
    return {k: v for k, v in out.items() if v is not None}


def fleet_status(state: FleetState, timeout: float = 2.0) -> list[ModelStatus]:
    models: dict[str, ModelStatus] = {m.model: ModelStatus(m.model, desired=m.desired, drain_seconds=m.drain_seconds,
                                                           autoscale=m.autoscale, last_decision=m.last_decision)
                                      for m in state.models}
    with httpx.Client(timeout=timeout) as client:
        for r in state.replicas:
            node = f"{r.node_ip} ({(r.node_id or '')[:8]})" if r.node_ip else ""
            rs = ReplicaStatus(r.index, r.url, ready=False, node=node, state=r.state, adapters=r.adapters)
            try:
                rs.ready = client.get(r.url + "/health").status_code == 200
                if rs.ready:
                    m = client.get(r.url + "/metrics")
                    if m.status_code == 200:
                        rs.figures = engine_figures(m.text)
            except httpx.HTTPError:
                pass
            models.setdefault(r.model, ModelStatus(r.model)).replicas.append(rs)
        host, _, port = str(state.metrics.gateway).rpartition(":")
        try:
            text = client.get(f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/metrics").text
        except httpx.HTTPError:
            text = ""
    for model, outcomes in migrations(text).items():
        if model in models:
            models[model].migrations = outcomes
    return list(models.values())


def migrations(text: str) -> dict[str, dict[str, float]]:
    """model -> outcome -> count, from the gateway's /metrics."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == total(MIGRATIONS):
                row = out.setdefault(s.labels["model"], {})
                row[s.labels["outcome"]] = row.get(s.labels["outcome"], 0.0) + s.value
    return out


def describe_migrations(outcomes: dict[str, float]) -> str:
    """``status``'s line on a model's requests whose replica failed."""
    saved = ("continued", "resent", "finished")
    lost = {k: v for k, v in sorted(outcomes.items()) if k not in saved}
    why = f" ({', '.join(f'{k} {v:.0f}' for k, v in lost.items())})" if lost else ""
    return (f"  lost replicas: {outcomes.get('continued', 0):.0f} streams continued elsewhere, "
            f"{outcomes.get('resent', 0):.0f} requests sent again, {sum(lost.values()):.0f} ended with an error{why}")


def describe_speculation(accepted: float, drafted: float, drafts: float) -> str:
    """``status``'s line on a speculating model, since its engines started (vLLM's formulas:
    acceptance rate = accepted / draft tokens, mean acceptance length = 1 + accepted / drafts)."""
    if not drafted:
        return "  speculative decoding: no draft proposed yet"
    return (f"  speculative decoding: {accepted / drafted:.1%} of draft tokens accepted ({accepted:,.0f}/{drafted:,.0f}), "
            f"{1 + accepted / drafts if drafts else 1:.2f} tokens per verified step")


def format_status(state: FleetState, models: list[ModelStatus]) -> str:
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    converging = "" if state.converged else "  (changing: see each replica's state)"
    lines = [f"endpoint: {state.endpoint}/v1{converging}", "",
             f"{'model':<34} {'ready/desired':>13} {'running':>8} {'waiting':>8} {'kv-cache':>9} {'drain s':>8}"]
    for m in models:
        desired = m.desired if m.desired is not None else len(m.replicas)
        lines.append(f"{m.name:<34} {m.ready:>6}/{desired:<6} {num(m.total('running')):>8} "
                     f"{num(m.total('waiting')):>8} {pct(m.total('kv_usage')):>9} {num(m.drain_seconds):>8}")
        if m.autoscale:
            a = m.autoscale
            lines.append(f"  autoscaling {a.min}..{a.max} on {a.signal} (target {a.target:g}); "
                         + (describe_decision(m.last_decision) if m.last_decision else "no decision yet"))
        if m.total("spec_draft_tokens") is not None:
            lines.append(describe_speculation(m.total("spec_accepted") or 0.0, m.total("spec_draft_tokens") or 0.0,
                                              m.total("spec_drafts") or 0.0))
        if m.migrations:
            lines.append(describe_migrations(m.migrations))
        for r in m.replicas:
            f = r.figures
            shown = r.state if r.state and r.state != "ready" else ("ready" if r.ready else "NOT READY")
            lines.append(f"  replica {r.index}  {r.url:<24} {shown:<9} "
                         f"running {num(f.get('running'))}  waiting {num(f.get('waiting'))}  "
                         f"kv {pct(f.get('kv_usage'))}" + (f"  node {r.node}" if r.node else "")
                         + (f"  adapters {', '.join(r.adapters)}" if r.adapters else ""))
    return "\n".join(lines)


def describe_decision(d: LastDecision, now: float | None = None) -> str:
    import time

    ago = (now if now is not None else time.time()) - d.at
    return f"last: {d.previous} -> {d.desired} ({d.reason}, {ago:.0f} s ago: {d.detail})"


# -- usage per tenant ----------------------------------------------------------------------------

USAGE_COUNTERS = {total(TENANT_REQUESTS): "requests", total(TENANT_PROMPT_TOKENS): "prompt",
                  total(TENANT_COMPLETION_TOKENS): "completion", total(TENANT_REJECTIONS): "rejected"}


def tenant_usage(text: str) -> dict[tuple[str, str], dict[str, float]]:
    """(tenant, model) -> requests (answered, any status), ok (2xx), prompt and completion tokens,
    rejected (by admission), from the gateway's /metrics."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = USAGE_COUNTERS.get(s.name)
            if key is None:
                continue
            row = out.setdefault((s.labels["tenant"], s.labels["model"]),
                                 dict.fromkeys(("requests", "ok", "prompt", "completion", "rejected"), 0.0))
            row[key] += s.value
            if key == "requests" and s.labels.get("status", "").startswith("2"):
                row["ok"] += s.value
    return out


def format_usage(rows: dict[tuple[str, str], dict[str, float]]) -> str:
    if not rows:
        return "no tenant usage yet (tenants are counted when the manifest has a tenants: section)"
    lines = [f"{'tenant':<20} {'model':<34} {'requests':>9} {'ok':>9} {'rejected':>9} {'prompt tok':>11} "
             f"{'completion tok':>14}"]
    for (tenant, model), r in sorted(rows.items()):
        lines.append(f"{tenant:<20} {model:<34} {r['requests']:>9.0f} {r['ok']:>9.0f} {r['rejected']:>9.0f} "
                     f"{r['prompt']:>11,.0f} {r['completion']:>14,.0f}")
    return "\n".join(lines)
