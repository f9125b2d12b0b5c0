"""The autoscaler: from what a model's engines report (and the requests the endpoint holds for it)
to how many replicas it should have. Pure: fed samples with their times, returns decisions; the
runtime core (``core.Fleet``) scrapes the samples and carries the decisions out (scale-down drains).

The rules are the Kubernetes HPA's (``kubernetes/pkg/controller/podautoscaler``), so that the local
and Ray runtimes and the chart's KEDA path behave alike:

* a raw recommendation per sample: ``ceil(sum of the signal / target)`` for a queue (``waiting``:
  engines' waiting requests plus held ones, an AverageValue target), ``ceil(ready x mean / target)``
  for a utilization (``kv_cache``, ``ttft`` p95 against target x SLO), kept at the current count
  within a 10% tolerance;
* scale up to the *lowest* recommendation of the scale-up window (the demand held all along), and
  down to the *highest* of the scale-down delay (HPA's stabilization windows);
* from zero to one replica at once when a request is held or queued (KEDA's activation; the rules
  above take it from there); to zero only after ``idle_seconds_before_zero`` with nothing running,
  waiting or held (KEDA's cooldownPeriod);
* one difference, written down: no decision but to zero while a replica of the model is starting,
  and the windows start over once it serves (the queue's growth during a cold start says nothing
  about need beyond the replica coming; the HPA, counting unready pods at their target, has the
  same intent).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from codefleet.gateway import metrics as gateway_metrics
from codefleet.plans import Autoscale
from codefleet.status import EngineLook, engine_look

__all__ = ["Autoscaler", "Decision", "EngineLook", "Sample", "engine_look"]

TOLERANCE = 0.1
"""HPA's --horizontal-pod-autoscaler-tolerance."""


@dataclass(frozen=True)
class Sample:
    """One look at a model: its ready replicas' engines and the endpoint's held requests."""

    t: float
    ready: int
    starting: int
    running: float
    waiting: float
    held: int
    kv: float | None = None
    """Mean KV-cache usage of the ready replicas (0-1)."""
    ttft_p95: float | None = None
    """p95 time to first token since the previous sample; None: no first token in between."""

    @property
    def busy(self) -> bool:
        return self.running + self.waiting + self.held > 0


@dataclass(frozen=True)
class Decision:
    t: float
    desired: int
    previous: int
    reason: str
    """from_zero | scale_up | scale_down | to_zero"""
    detail: str


class Autoscaler:
    def __init__(self, policy: Autoscale, desired: int, now: float) -> None:
        self.policy = policy
        self.desired = policy.clamp(desired)
        self.history: deque[tuple[float, int]] = deque()
        self.started = now
        self.last_busy = now
        self.last: Decision | None = None

    def raw(self, s: Sample) -> tuple[int, str]:
        """This sample's recommendation, and the arithmetic behind it."""
        p = self.policy
        if p.signal == "waiting":
            demand = s.waiting + s.held
            n = math.ceil(demand / p.target - 1e-9)
            why = f"{demand:g} waiting (held {s.held}) / target {p.target:g} per replica"
            ratio = demand / (p.target * s.ready) if s.ready else None
        else:
            value = s.kv if p.signal == "kv_cache" else s.ttft_p95
            if value is None or not s.ready:
                return (0 if not s.busy else self.desired), f"no {p.signal} figure"
            n = math.ceil(s.ready * value / p.target - 1e-9)
            unit = "s p95 TTFT" if p.signal == "ttft" else " KV-cache usage"
            why = f"{s.ready} x {value:.3g}{unit} / target {p.target:.3g}"
            ratio = value / p.target
        if ratio is not None and abs(ratio - 1) <= TOLERANCE:
            return s.ready, why + " (within tolerance)"
        return n, why

    def observe(self, s: Sample) -> Decision | None:
        """Feed one sample; a decision when the desired count changes."""
        p = self.policy
        if s.busy:
            self.last_busy = s.t
        n, why = self.raw(s)
        if s.starting:
            # A replica on its way: what the queue does meanwhile says nothing about need beyond it;
            # the windows start again once it serves.
            self.history.clear()
            self.started = s.t
        self.history.append((s.t, n))
        horizon = max(p.scale_up_window_seconds, p.scale_down_delay_seconds)
        while self.history and self.history[0][0] < s.t - horizon:
            self.history.popleft()
        current = self.desired
        if current == 0:
            if s.held or s.waiting:
                return self._decide(s.t, max(1, p.min_replicas), "from_zero",
                                    f"{s.held} request(s) held with no replica ({why})")
            return None
        covered_up = s.t - self.started >= p.scale_up_window_seconds
        covered_down = s.t - self.started >= p.scale_down_delay_seconds
        up = min(v for t, v in self.history if t >= s.t - p.scale_up_window_seconds)
        down = max(v for t, v in self.history if t >= s.t - p.scale_down_delay_seconds)
        floor = max(1, p.min_replicas)
        if up > current and covered_up and not s.starting and current < p.max_replicas:
            return self._decide(s.t, p.clamp(up), "scale_up",
                                f"{why}; above {current} for {p.scale_up_window_seconds:g} s")
        if down < current and covered_down and current > floor:
            return self._decide(s.t, max(floor, down), "scale_down",
                                f"{why}; below {current} for {p.scale_down_delay_seconds:g} s")
        if (p.min_replicas == 0 and not s.busy and s.t - self.last_busy >= p.idle_seconds_before_zero
                and s.t - self.started >= p.idle_seconds_before_zero):
            return self._decide(s.t, 0, "to_zero", f"no request for {s.t - self.last_busy:.0f} s")
        return None

    def set(self, desired: int, now: float) -> None:
        """An operator's count (``codefleet apply`` with a new ``replicas``): start the windows over."""
        self.desired = self.policy.clamp(desired)
        self.history.clear()
        self.started = now

    def _decide(self, t: float, desired: int, reason: str, detail: str) -> Decision | None:
        if desired == self.desired:
            return None
        d = Decision(t, desired, self.desired, reason, detail)
        self.desired = desired
        # a fresh window after each change: the next step is judged on the new count's samples
        self.history.clear()
        self.started = t
        self.last = d
        return d


# -- reading the signals -------------------------------------------------------------------------

def sample_of(now: float, ready: int, starting: int, held: int, looks: Iterable[tuple[str, EngineLook]],
              ttft_seen: dict[str, dict[float, float]]) -> Sample:
    """One model's sample from its ready replicas' engines (``looks``: replica name -> what its
    /metrics said; one that did not answer is not there). The TTFT p95 is over the first tokens
    since the previous sample: ``ttft_seen`` holds each replica's buckets then, and is updated."""
    running = waiting = 0.0
    kvs: list[float] = []
    ttft: dict[float, float] = {}
    for name, look in looks:
        running += look.running or 0.0
        waiting += look.waiting or 0.0
        if look.kv is not None:
            kvs.append(look.kv)
        buckets = look.ttft_buckets
        for le, v in bucket_delta(buckets, ttft_seen.get(name)).items():
            ttft[le] = ttft.get(le, 0.0) + v
        ttft_seen[name] = buckets
    return Sample(now, ready, starting, running, waiting, held, kv=sum(kvs) / len(kvs) if kvs else None,
                  ttft_p95=histogram_quantile(0.95, ttft))


HELD = gateway_metrics.HELD


def held_requests(text: str) -> dict[str, int]:
    """The gateway's held requests per model, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == HELD:
                out[s.labels["model"]] = int(s.value)
    return out


def bucket_delta(now: dict[float, float], before: dict[float, float] | None) -> dict[float, float]:
    """Counts added since ``before`` (an engine restarted in between: all of ``now``)."""
    if not before or any(now.get(le, 0.0) < v for le, v in before.items()):
        return dict(now)
    return {le: v - before.get(le, 0.0) for le, v in now.items()}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative buckets (linear within a bucket; the
    +Inf bucket answers the highest finite bound). None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le
