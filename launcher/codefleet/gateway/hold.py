"""Scale from zero at the endpoint: requests for a model with no ready replica wait here, in
arrival order, within the model's queue size and hold timeout; beyond either they get 503 with a
Retry-After estimated from the cold starts seen. Released, oldest first, when a replica shows up."""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable, Collection

from codefleet.gateway import answers
from codefleet.gateway.config import COLD_START_S, Hold
from codefleet.gateway.metrics import GatewayMetrics
from codefleet.gateway.upstream import Exchange


class Holding:
    def __init__(self, hold: dict[str, Hold], metrics: GatewayMetrics, recheck: Callable[[], None]) -> None:
        self.hold = hold
        self.metrics = metrics
        self.recheck = recheck
        """Called when a request is held: look at the router's workers again soon."""
        self.held: dict[str, collections.deque[Exchange]] = {m: collections.deque() for m in hold}
        self.began: dict[str, float] = {}
        """Per model: when its current wait for a replica began (the oldest held request's arrival)."""
        self.cold_start = {m: h.cold_start_s for m, h in hold.items()}
        """Per model: the Retry-After estimate of a wait, the last cold start seen (configured at first)."""

    def configure(self, hold: dict[str, Hold]) -> None:
        """The holds after a reload (``codefleet apply`` added or removed an adapter): a new one gets
        its queue; the requests waiting for one no longer held are answered now."""
        for model in [m for m in self.held if m not in hold]:
            q = self.held.pop(model)
            while q:
                e = q.popleft()
                if e.hold_timer is not None:
                    e.hold_timer.cancel()
                    e.hold_timer = None
                e.reject(answers.model_starting(model, "it is no longer served", 1))
            self.began.pop(model, None)
            self.metrics.held.labels(model).set(0)
        for model, h in hold.items():
            self.held.setdefault(model, collections.deque())
            self.cold_start.setdefault(model, h.cold_start_s)
        self.hold = dict(hold)

    def holds(self, model: str) -> bool:
        h = self.hold.get(model)
        return h is not None and h.max_requests > 0

    def any_held(self) -> bool:
        return any(self.held.values())

    def hold_one(self, exchange: Exchange) -> None:
        """Keep ``exchange`` until its model has a ready replica; beyond the queue size, 503."""
        model = exchange.model
        h, q = self.hold[model], self.held[model]
        while q and q[0].client.closed:  # left while waiting
            self._unhold(q.popleft(), "gone")
        if len(q) >= h.max_requests:
            self.metrics.hold_outcomes.labels(model, "overflow").inc()
            self._refuse(exchange, f"{len(q)} requests are already waiting for its first replica")
            return
        now = time.monotonic()
        if not q:
            self.began.setdefault(model, now)
        exchange.held_at = now
        exchange.hold_timer = asyncio.get_running_loop().call_later(h.timeout_s, self._expired, exchange)
        q.append(exchange)
        self.metrics.held.labels(model).set(len(q))
        self.recheck()

    def retry_after(self, model: str) -> int:
        """Seconds until a replica is likely ready: the last cold start seen, less the time this wait
        has lasted; once past that estimate, a quarter of it. Within 1..60 (the OpenAI SDK honours
        Retry-After up to 60 s)."""
        est = self.cold_start.get(model, COLD_START_S)
        began = self.began.get(model)
        left = est - (time.monotonic() - began) if began is not None else est
        if left < 1:
            left = est / 4
        return max(1, min(60, math.ceil(left)))

    def _refuse(self, exchange: Exchange, why: str) -> None:
        exchange.reject(answers.model_starting(exchange.model, why, self.retry_after(exchange.model)))

    def _expired(self, exchange: Exchange) -> None:
        q = self.held.get(exchange.model)
        if q is None or exchange not in q:
            return
        q.remove(exchange)
        self.metrics.held.labels(exchange.model).set(len(q))
        if exchange.client.closed:
            self._unhold(exchange, "gone")
            return
        self.metrics.hold_outcomes.labels(exchange.model, "timeout").inc()
        self._refuse(exchange, f"waited {self.hold[exchange.model].timeout_s:g} s (the hold timeout)")
        if not q:
            self.began.pop(exchange.model, None)

    def _unhold(self, exchange: Exchange, outcome: str) -> None:
        if exchange.hold_timer is not None:
            exchange.hold_timer.cancel()
            exchange.hold_timer = None
        if outcome == "gone":
            exchange.end()
        self.metrics.hold_outcomes.labels(exchange.model, outcome).inc()

    def release(self, available: Collection[str]) -> None:
        """Start the held requests of every model now in ``available``, oldest first."""
        now = time.monotonic()
        for model, q in self.held.items():
            if not q or model not in available:
                continue
            began = self.began.pop(model, None)
            if began is not None:
                self.cold_start[model] = max(1.0, now - began)
            while q:
                e = q.popleft()
                if e.client.closed:
                    self._unhold(e, "gone")
                    continue
                self._unhold(e, "released")
                self.metrics.hold_seconds.labels(model).observe(now - e.held_at)
                e.start()
            self.metrics.held.labels(model).set(0)

    def stop(self) -> None:
        """The fleet is stopping: every held request gets 503."""
        for model, q in self.held.items():
            while q:
                e = q.popleft()
                self._unhold(e, "shutdown")
                if e.client.closed:
                    e.end()
                else:
                    e.reject(answers.SHUTTING_DOWN)
            self.metrics.held.labels(model).set(0)
        self.began.clear()
