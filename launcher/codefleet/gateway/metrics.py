"""The gateway's Prometheus metrics: their names, defined once (the autoscaler, ``status`` and the
dashboards import them from here), and the registry one gateway process serves."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()

REQUESTS = "codefleet_gateway_requests"
REJECTED = "codefleet_gateway_rejected"
HELD = "codefleet_gateway_held_requests"
READY = "codefleet_gateway_ready_replicas"
HOLD = "codefleet_gateway_hold"
HOLD_SECONDS = "codefleet_gateway_hold_seconds"
EVICTED = "codefleet_gateway_connections_evicted"
AFFINITY = "codefleet_gateway_prefix_affinity"
MIGRATIONS = "codefleet_gateway_migrations"
TENANT_REQUESTS = "codefleet_tenant_requests"
TENANT_PROMPT_TOKENS = "codefleet_tenant_prompt_tokens"
TENANT_COMPLETION_TOKENS = "codefleet_tenant_completion_tokens"
TENANT_REJECTIONS = "codefleet_tenant_rejections"


def total(counter: str) -> str:
    """A counter's exposed sample name (prometheus_client appends ``_total``)."""
    return counter + "_total"


class GatewayMetrics:
    """One gateway's metrics; labelled children looked up once (``labels()`` costs microseconds
    on every request)."""

    def __init__(self, held_models: Iterable[str]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(REQUESTS, "Requests answered by the gateway, by model and HTTP status",
                                ["model", "status"], registry=r)
        self.rejected = Counter(REJECTED, "Requests the gateway answered itself without reaching the router",
                                ["reason"], registry=r)
        self.evicted = Counter(EVICTED, "Connections closed at the connection cap to admit a new one (the "
                                        "oldest with no request in progress)", registry=r)
        self.ready = Gauge(READY, "Healthy workers per model in the router, as the gateway last saw them",
                           ["model"], registry=r)
        self.held = Gauge(HELD, "Requests held for a model with no ready replica (scale-from-zero demand)",
                          ["model"], registry=r)
        self.hold_outcomes = Counter(HOLD, "Held requests by outcome (released, timeout, overflow, gone, shutdown)",
                                     ["model", "outcome"], registry=r)
        self.hold_seconds = Histogram(HOLD_SECONDS, "How long released requests were held", ["model"], registry=r,
                                      buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600))
        self.affinity = Counter(AFFINITY, "Session keys chosen by prompt prefix (policy prefix_affinity), by outcome: "
                                          "prefix (a known prefix's key), new, spill (a hot key's sibling), "
                                          "spread (nothing to keep together)",
                                ["model", "outcome"], registry=r)
        self.migrations = Counter(MIGRATIONS, "Requests whose replica failed, by outcome: continued (a stream went "
                                              "on on another replica), resent (sent again whole, nothing had "
                                              "reached the client), finished (only [DONE] was missing), "
                                              "exhausted (no continuation left), not_continuable, timeout, "
                                              "client_gone (the error event, or nothing, as before); how: a "
                                              "continuation's prompt (ids: the engine's token ids, text: "
                                              "re-tokenized, whole: nothing had been sent)",
                                  ["model", "outcome", "how"], registry=r)
        for m in held_models:
            self.held.labels(m).set(0)
        # tenants (labels: tenant names and models from the configuration only)
        self.tenant_requests = Counter(TENANT_REQUESTS, "Requests answered, by tenant, model and status",
                                       ["tenant", "model", "status"], registry=r)
        self.tenant_prompt_tokens = Counter(TENANT_PROMPT_TOKENS, "Prompt tokens (each answer's usage)",
                                            ["tenant", "model"], registry=r)
        self.tenant_completion_tokens = Counter(TENANT_COMPLETION_TOKENS, "Completion tokens (each answer's usage)",
                                                ["tenant", "model"], registry=r)
        self.tenant_rejections = Counter(TENANT_REJECTIONS, "Requests refused by admission, by reason",
                                         ["tenant", "model", "reason"], registry=r)
        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def answered(self, model: str, status: str, tenant: str = "") -> None:
        self.child(self.requests, model, status).inc()
        if tenant:
            self.child(self.tenant_requests, tenant, model, status).inc()

    def affinity_outcome(self, model: str, outcome: str) -> None:
        self.child(self.affinity, model, outcome).inc()

    def migrated(self, model: str, outcome: str, how: str = "") -> None:
        self.child(self.migrations, model, outcome, how).inc()

    def refused(self, reason: str) -> None:
        self.child(self.rejected, reason).inc()

    def tokens(self, tenant: str, model: str, prompt: int, completion: int) -> None:
        if prompt:
            self.child(self.tenant_prompt_tokens, tenant, model).inc(prompt)
        if completion:
            self.child(self.tenant_completion_tokens, tenant, model).inc(completion)
