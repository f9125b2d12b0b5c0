"""Per-tenant admission at the endpoint: requests per minute, tokens per minute, requests in
flight, allowed models. Plain objects over a clock; ``server.Gateway`` asks and reports.

Rates are token buckets refilled evenly (a bucket of ``requests_per_minute`` requests that
refills one every 60 / rpm seconds), as OpenAI describes its own limits. A refused request gets
429 with when to come back, computed from the bucket, in the headers OpenAI sends and its SDK
reads (``retry-after-ms`` first, then ``retry-after``; it retries 429 by itself):

* each refusal of a request-rate limit books the next free slot: the first refused request is
  told to come back when the bucket next holds a request, the second one slot later, and so on,
  so a burst that the SDK retries comes back spread over the refill rather than all at once
  (which would refuse all but one again and use up its retries);
* tokens are counted when an answer ends (its ``usage``); a request is admitted while the token
  bucket is above zero, and an answer larger than what is left takes it below zero: the tenant
  then waits until the refill has paid the debt.

With several gateways (the chart runs two frontend pods) each enforces ``1/pods`` of every rate
and of the concurrency: no shared store. The bound: the fleet never admits more than the limit;
a tenant whose requests all land on one pod gets ``1/pods`` of it (kube-proxy spreads connections,
and the SDK keeps one connection per client, so one client may see that share).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from codefleet.gateway.answers import Rejection, error_body


@dataclass
class Bucket:
    """``capacity`` units, refilled at ``rate`` per second; ``level`` may go below zero (a debt)."""

    capacity: float
    rate: float
    level: float
    at: float
    booked_until: float = 0.0
    """The last slot promised to a refused request (see the module's doc)."""

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def seconds_until(self, need: float, now: float) -> float:
        """When the level will reach ``need`` (0 if it has)."""
        return max(0.0, (need - self.level) / self.rate)

    def reset_seconds(self, now: float) -> float:
        """Until the bucket is full again (OpenAI's x-ratelimit-reset-*)."""
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass
class TenantState:
    name: str
    limits: dict[str, Any]
    requests: Bucket | None = None
    tokens: Bucket | None = None
    active: int = 0
    max_active: int | None = None
    models: frozenset[str] | None = None
    counters: dict[str, float] = field(default_factory=dict)
    mean_s: float = 1.0
    """Smoothed duration of the tenant's requests (for the Retry-After of its concurrency limit)."""


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``20ms``."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    s = math.ceil(seconds)
    m, s = divmod(s, 60)
    return f"{m}m{s}s" if m else f"{s}s"


class Admission:
    """The tenants' buckets. ``admit`` before forwarding; ``finish`` when the answer has ended."""

    def __init__(self, tenants: dict[str, dict[str, Any]], pods: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.pods = max(1, pods)
        self.tenants: dict[str, TenantState] = {}
        self.configure(tenants)

    def configure(self, tenants: dict[str, dict[str, Any]]) -> None:
        """New limits (a reload): buckets keep their level, scaled to a new size."""
        now = self.clock()
        old = self.tenants
        self.tenants = {}
        for name, lim in tenants.items():
            t = TenantState(name, dict(lim))
            prev = old.get(name)
            for key, attr, per in (("requests_per_minute", "requests", 1.0), ("tokens_per_minute", "tokens", 1.0)):
                if lim.get(key):
                    cap = lim[key] * per / self.pods
                    was = getattr(prev, attr) if prev else None
                    level = cap if was is None else min(cap, was.level * cap / was.capacity)
                    setattr(t, attr, Bucket(cap, cap / 60.0, level, now))
            if lim.get("max_concurrent"):
                t.max_active = max(1, lim["max_concurrent"] // self.pods)
            if lim.get("models") is not None:
                t.models = frozenset(lim["models"])
            if prev is not None:
                t.active, t.counters, t.mean_s = prev.active, prev.counters, prev.mean_s
            self.tenants[name] = t

    @property
    def enabled(self) -> bool:
        return bool(self.tenants)

    def admit(self, tenant: str, model: str) -> Rejection | None:
        """None: admitted (call ``finish`` once it has ended); else the 403 or 429 to send."""
        t = self.tenants.get(tenant)
        if t is None:
            return None  # no limits for this tenant
        if t.models is not None and model not in t.models:
            return _reject(403, f"Tenant `{tenant}` may not use model `{model}`; its models: "
                                f"{', '.join(sorted(t.models)) or 'none'}.", "model_not_allowed", "model_not_allowed",
                           param="model")
        now = self.clock()
        for b in (t.requests, t.tokens):
            if b is not None:
                b.refill(now)
        if t.max_active is not None and t.active >= t.max_active:
            # one of them is likely to end after mean duration / how many there are
            return self._too_many(t, now, "concurrent", f"{t.active} requests in flight (limit {t.max_active}"
                                  + (f" on this endpoint pod, 1/{self.pods} of {t.limits['max_concurrent']}"
                                     if self.pods > 1 else "") + ")", t.mean_s / t.active)
        if t.tokens is not None and t.tokens.level <= 0:
            wait = t.tokens.seconds_until(min(1.0, t.tokens.capacity), now)
            return self._too_many(t, now, "tokens", f"the tokens-per-minute limit "
                                  f"({t.limits['tokens_per_minute']}) is used up", wait)
        if t.requests is not None:
            b = t.requests
            if b.level < 1:
                # the next free slot after the ones already promised
                slot = max(now + b.seconds_until(1.0, now), b.booked_until + 1.0 / b.rate)
                b.booked_until = slot
                return self._too_many(t, now, "requests", f"the requests-per-minute limit "
                                      f"({t.limits['requests_per_minute']}) is reached", slot - now)
            b.level -= 1
        t.active += 1
        return None

    def finish(self, tenant: str, tokens: int, seconds: float | None = None) -> None:
        t = self.tenants.get(tenant)
        if t is None:
            return
        t.active = max(0, t.active - 1)
        if seconds is not None:
            t.mean_s = 0.8 * t.mean_s + 0.2 * seconds
        if t.tokens is not None and tokens:
            t.tokens.refill(self.clock())
            t.tokens.level -= tokens

    def headers(self, tenant: str) -> tuple[tuple[bytes, bytes], ...]:
        """OpenAI's x-ratelimit-* headers for the tenant's buckets (on 429s)."""
        t = self.tenants.get(tenant)
        if t is None:
            return ()
        now = self.clock()
        out: list[tuple[bytes, bytes]] = []
        for name, b in (("requests", t.requests), ("tokens", t.tokens)):
            if b is None:
                continue
            b.refill(now)
            out += [(f"x-ratelimit-limit-{name}".encode(), str(int(b.capacity)).encode()),
                    (f"x-ratelimit-remaining-{name}".encode(), str(max(0, math.floor(b.level))).encode()),
                    (f"x-ratelimit-reset-{name}".encode(), _duration(b.reset_seconds(now)).encode())]
        return tuple(out)

    def _too_many(self, t: TenantState, now: float, which: str, why: str, wait: float) -> Rejection:
        wait = max(wait, 0.001)
        headers = (*self.headers(t.name), (b"retry-after-ms", str(math.ceil(wait * 1000)).encode()),
                   (b"retry-after", str(math.ceil(wait)).encode()))
        return _reject(429, f"Rate limit for tenant `{t.name}`: {why}. Retry in {wait:.2f} s.",
                       "rate_limit_exceeded", f"rate_limit_{which}", headers=headers)


def _reject(status: int, message: str, code: str, reason: str, *, param: str | None = None,
            headers: tuple[tuple[bytes, bytes], ...] = ()) -> Rejection:
    # OpenAI's types: a 429's names the limit ("requests", "tokens"); a 403 is a request error
    type_ = reason.removeprefix("rate_limit_") if status == 429 else "invalid_request_error"
    return Rejection(status, error_body(message, type_=type_, param=param, code=code), reason, headers)
