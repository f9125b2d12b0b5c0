"""Prometheus scrape configuration and the Grafana dashboard, from one list of queries.

The engines' ports are picked when they start, so the launcher keeps a Prometheus file-based
service-discovery file (``<run dir>/prometheus/engines.json``) current; the scrape configuration
points at it and at the fixed metrics ports of the launcher, the gateway and vllm-router.

Every dashboard panel uses one of ``QUERIES``; the same strings are what the tests run against a
real Prometheus, so a panel cannot silently use a metric name that does not exist.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from codefleet.gateway import metrics as gateway_metrics
from codefleet.manifest import LoadedManifest
from codefleet.plans import FleetPlan

_REQUESTS = gateway_metrics.total(gateway_metrics.REQUESTS)

ENGINE_SD_FILE = "prometheus/engines.json"
RULES_FILE = "rules.yaml"


@dataclass(frozen=True)
class Query:
    key: str
    title: str
    expr: str
    unit: str
    """Grafana unit id."""


_M = '{model_name=~"$model"}'
QUERIES: tuple[Query, ...] = (
    Query("ttft_p50", "Time to first token p50", "histogram_quantile(0.5, sum by (le, model_name) "
          f"(rate(vllm:time_to_first_token_seconds_bucket{_M}[5m])))", "s"),
    Query("ttft_p95", "Time to first token p95", "histogram_quantile(0.95, sum by (le, model_name) "
          f"(rate(vllm:time_to_first_token_seconds_bucket{_M}[5m])))", "s"),
    Query("output_tokens_per_s", "Output tokens/s",
          f"sum by (model_name) (rate(vllm:generation_tokens_total{_M}[5m]))", "short"),
    Query("requests_per_s", "Finished requests/s",
          f"sum by (model_name) (rate(vllm:request_success_total{_M}[5m]))", "reqps"),
    Query("running", "Requests running", f"sum by (model_name) (vllm:num_requests_running{_M})", "short"),
    Query("waiting", "Requests waiting (queue depth)", f"sum by (model_name) (vllm:num_requests_waiting{_M})",
          "short"),
    Query("kv_usage", "KV-cache usage (fullest replica)", f"max by (model_name) (vllm:kv_cache_usage_perc{_M})",
          "percentunit"),
    Query("prefix_hit_rate", "Prefix-cache hit rate",
          f"sum by (model_name) (rate(vllm:prefix_cache_hits_total{_M}[5m])) / "
          f"sum by (model_name) (rate(vllm:prefix_cache_queries_total{_M}[5m]))", "percentunit"),
    # only speculating engines export these (vllm/v1/spec_decode/metrics.py); vLLM's formula
    Query("spec_acceptance", "Speculative decoding: draft tokens accepted",
          f"sum by (model_name) (rate(vllm:spec_decode_num_accepted_tokens_total{_M}[5m])) / "
          f"sum by (model_name) (rate(vllm:spec_decode_num_draft_tokens_total{_M}[5m]))", "percentunit"),
    Query("replicas_ready", "Replicas ready / desired",
          'sum by (model) (codefleet_replicas_ready{model=~"$model"}) / '
          'sum by (model) (codefleet_replicas_desired{model=~"$model"})', "percentunit"),
    Query("gateway_errors", "Endpoint answers by status",
          f'sum by (model, status) (rate({_REQUESTS}{{model=~"$model"}}[5m]))', "reqps"),
)


def engine_targets(replicas: list[tuple[str, int, str, str]]) -> list[dict[str, Any]]:
    """file_sd entries for (model, replica index, url, node) of each engine."""
    return [{"targets": [url.removeprefix("http://")], "labels": {"model": model, "replica": str(i), "node": node}}
            for model, i, url, node in replicas]


def write_engine_targets(run_dir: Path, replicas: list[tuple[str, int, str, str]]) -> Path:
    path = run_dir / ENGINE_SD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(engine_targets(replicas), indent=2))
    tmp.replace(path)  # Prometheus re-reads the file on change; never let it see half a file
    return path


def scrape_config(plan: FleetPlan, run_dir: Path, interval: str = "15s",
                  ports: dict[str, int] | None = None, rule_files: list[str] | None = None) -> dict[str, Any]:
    """``ports``: the launcher's, gateway's and router's metrics ports of a running fleet (when the
    manifest has 0, a free port, for them)."""
    m = plan.metrics
    node = socket.gethostname()
    ports = {"launcher": m.launcher_port, "gateway": m.gateway_port, "router": m.router_port} | (ports or {})

    def static(job: str, port: int) -> dict[str, Any]:
        return {"job_name": job, "static_configs": [{"targets": [f"{m.host}:{port}"], "labels": {"node": node}}]}

    config: dict[str, Any] = {"global": {"scrape_interval": interval, "evaluation_interval": interval}}
    if rule_files:
        config["rule_files"] = rule_files
    config["scrape_configs"] = [
        {"job_name": "vllm", "file_sd_configs": [{"files": [str(run_dir / ENGINE_SD_FILE)], "refresh_interval": "5s"}]},
        static("codefleet-launcher", ports["launcher"]),
        static("codefleet-gateway", ports["gateway"]),
        static("vllm-router", ports["router"]),
    ]
    return config


def scrape_config_yaml(plan: FleetPlan, run_dir: Path, interval: str = "15s",
                       ports: dict[str, int] | None = None, rule_files: list[str] | None = None) -> str:
    head = ("# Generated by `codefleet prometheus-config`: engines come from the launcher's file_sd\n"
            "# file (kept current as replicas restart); launcher, gateway and router from the manifest.\n")
    return head + yaml.safe_dump(scrape_config(plan, run_dir, interval, ports, rule_files), sort_keys=False)


#: Recording rules: the per-model series the alerts (and anyone's ad-hoc queries) build on.
RECORDING: tuple[tuple[str, str], ...] = (
    ("model_name:vllm_time_to_first_token_seconds:p95_5m",
     "histogram_quantile(0.95, sum by (le, model_name) (rate(vllm:time_to_first_token_seconds_bucket[5m])))"),
    ("model_name:vllm_num_requests_waiting:sum", "sum by (model_name) (vllm:num_requests_waiting)"),
    ("model_name:vllm_kv_cache_usage_perc:max", "max by (model_name) (vllm:kv_cache_usage_perc)"),
    ("model_name:vllm_generation_tokens:rate5m", "sum by (model_name) (rate(vllm:generation_tokens_total[5m]))"),
    ("codefleet:gateway_error_ratio:rate5m",
     f'sum(rate({_REQUESTS}{{status=~"5.."}}[5m])) / sum(rate({_REQUESTS}[5m]))'),
)


def _promql_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def held_query(model: str, adapters: tuple[str, ...] = ()) -> str:
    """Requests the frontend pods hold for ``model`` and its LoRA adapters (scale-from-zero demand),
    0 when none."""
    if not adapters:
        return f"sum({gateway_metrics.HELD}{{model={_promql_string(model)}}}) or vector(0)"
    names = "|".join(re.escape(n) for n in (model, *adapters))
    return f"sum({gateway_metrics.HELD}{{model=~{_promql_string(names)}}}) or vector(0)"


def autoscale_query(model: str, signal: str) -> tuple[str, str]:
    """KEDA's Prometheus trigger for a model's autoscaling signal: (metricType, query). The same
    rules as the local autoscaler (``runtime.autoscale``): a queue is an AverageValue over the
    replicas (the HPA divides the sum by the target), a utilization is a Value (the HPA scales the
    current count by value / target)."""
    m = _promql_string(model)
    if signal == "waiting":
        return "AverageValue", (f"(sum(vllm:num_requests_waiting{{model_name={m}}}) or vector(0)) + "
                                f"({held_query(model)})")
    if signal == "kv_cache":
        return "Value", f"avg(vllm:kv_cache_usage_perc{{model_name={m}}})"
    if signal == "ttft":
        return "Value", ("histogram_quantile(0.95, sum by (le) "
                         f"(rate(vllm:time_to_first_token_seconds_bucket{{model_name={m}}}[1m])))")
    raise ValueError(f"unknown autoscaling signal {signal!r}")


def alert_rules(loaded: LoadedManifest) -> dict[str, Any]:
    """Recording and alert rules for the fleet of a manifest (thresholds from ``alerts:`` and each model's SLO)."""
    man = loaded.manifest
    a = man.alerts
    recording: list[dict[str, Any]] = [{"record": name, "expr": expr} for name, expr in RECORDING]
    for spec in man.models:
        slo = spec.ttft_slo_seconds or man.defaults.ttft_slo_seconds
        recording.append({"record": "codefleet:ttft_p95_slo_seconds", "expr": f"vector({slo:g})",
                          "labels": {"model_name": spec.name}})

    def alert(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict[str, Any]:
        rule: dict[str, Any] = {"alert": name, "expr": expr}
        if for_:
            rule["for"] = for_
        rule["labels"] = {"severity": severity}
        rule["annotations"] = {"summary": summary, "description": description}
        return rule

    alerts = [
        alert("CodefleetModelDown", "codefleet_replicas_desired > 0 and codefleet_replicas_ready == 0", "2m", "page",
              "{{ $labels.model }} has no ready replica",
              "Every replica of {{ $labels.model }} is down or unregistered; requests for it get 503."),
        alert("CodefleetReplicaRestarting", f"increase(codefleet_replica_restarts_total[15m]) >= {a.restarts}", "",
              "page", "{{ $labels.model }} replica {{ $labels.replica }} keeps restarting",
              "{{ $value | humanize }} restarts in 15 minutes: read the engine's log (codefleet status)."),
        alert("CodefleetTTFTOverSLO", "model_name:vllm_time_to_first_token_seconds:p95_5m "
              "> on (model_name) codefleet:ttft_p95_slo_seconds", "10m", "warning",
              "{{ $labels.model_name }}: p95 time to first token {{ $value | humanizeDuration }} over its SLO",
              "Add replicas, lower max_num_seqs, or route less traffic to this model."),
        alert("CodefleetRequestsWaiting",
              f"min_over_time(model_name:vllm_num_requests_waiting:sum[{a.queue_minutes}m]) > 0", "", "page",
              f"{{{{ $labels.model_name }}}}: requests have been waiting for over {a.queue_minutes} minutes",
              f"The queue of {{{{ $labels.model_name }}}} was never empty in {a.queue_minutes} minutes "
              f"(never fewer than {{{{ $value }}}} waiting): the model is saturated."),
        alert("CodefleetKVCacheNearlyFull", f"model_name:vllm_kv_cache_usage_perc:max > {a.kv_cache_usage:g}", "5m",
              "warning", "{{ $labels.model_name }}: KV cache {{ $value | humanizePercentage }} full",
              "Requests are being preempted or queued for KV room."),
        alert("CodefleetEndpointErrors", f"codefleet:gateway_error_ratio:rate5m > {a.error_ratio:g}", "5m", "page",
              "The endpoint answers {{ $value | humanizePercentage }} of requests with 5xx",
              f"See {_REQUESTS} by model and status, and the router's log."),
        alert("CodefleetTargetDown", 'up{job=~"vllm|vllm-router|codefleet-.*"} == 0', "2m", "warning",
              "{{ $labels.job }} target {{ $labels.instance }} is not scrapeable",
              "Prometheus cannot read its metrics: the process is down or its port changed."),
    ]
    # One group: rules in a group run in order, so each alert reads this evaluation's recorded series
    # (across groups the order is not defined, and promtool's tests flake on it).
    return {"groups": [{"name": "codefleet", "rules": recording + alerts}]}


def alert_rules_yaml(loaded: LoadedManifest) -> str:
    head = f"# Generated by `codefleet prometheus-config {loaded.file.name}`; thresholds from its alerts: section.\n"
    return head + yaml.safe_dump(alert_rules(loaded), sort_keys=False, width=200)


def dashboard() -> dict[str, Any]:
    panels = []
    for i, q in enumerate(QUERIES):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": q.title,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "fieldConfig": {"defaults": {"unit": q.unit}, "overrides": []},
            "targets": [{"refId": "A", "expr": q.expr, "legendFormat": "{{model_name}}{{model}} {{status}}".strip(),
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}],
        })
    return {
        "title": "codefleet", "uid": "codefleet", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "tags": ["vllm", "codefleet"],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
            {"name": "model", "type": "query", "label": "Model", "multi": True, "includeAll": True,
             "allValue": ".*", "current": {"text": "All", "value": "$__all"},
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(codefleet_replicas_desired, model)", "refId": "models"},
             "definition": "label_values(codefleet_replicas_desired, model)", "refresh": 2},
        ]},
        "panels": panels,
    }


def dashboard_json() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"
