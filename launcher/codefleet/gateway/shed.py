"""Overload shedding: a model with a queue limit gets 429 with a Retry-After when its engines'
waiting queue is deeper than the limit, for tenants holding at least their fair share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import ClientSession
from aiohttp.client_exceptions import ClientError

from codefleet.gateway import answers
from codefleet.gateway.admission import Admission
from codefleet.gateway.answers import Rejection
from codefleet.status import engine_look

QUEUE_POLL_S = 1.0
"""How often the engines of a model with a queue limit are read."""


class Shedding:
    def __init__(self, limits: dict[str, int], admission: Admission) -> None:
        self.limits = limits
        self.admission = admission
        #: Per model: its engines' waiting requests, and requests finished per second (EWMA).
        self.queue_depth: dict[str, float] = {}
        self.drain_rate: dict[str, float] = {}

    async def watch(self, session: ClientSession, workers: Callable[[], list[tuple[str, str]]]) -> None:
        """Every QUEUE_POLL_S: each shed model's engines' waiting requests (their own /metrics) and
        how fast they finish requests (the rate at which the queue drains). ``workers``: the
        router's (url, model) pairs."""
        last: dict[str, tuple[float, float]] = {}  # model -> (time, finished requests)
        while True:
            await asyncio.sleep(QUEUE_POLL_S)
            waiting: dict[str, float] = {}
            done: dict[str, float] = {}
            for url, model in list(workers()):
                if model not in self.limits:
                    continue
                try:
                    async with session.get(url + "/metrics") as r:
                        text = await r.text()
                    look = engine_look(text)
                except (ClientError, TimeoutError, ValueError, KeyError):
                    continue  # an engine restarting or not answering: the others still count
                waiting[model] = waiting.get(model, 0.0) + (look.waiting or 0.0)
                done[model] = done.get(model, 0.0) + (look.finished or 0.0)
            now = time.monotonic()
            for model in self.limits:
                self.queue_depth[model] = waiting.get(model, 0.0)
                if model in done:
                    prev = last.get(model)
                    if prev is not None and now > prev[0] and done[model] >= prev[1]:
                        rate = (done[model] - prev[1]) / (now - prev[0])
                        old = self.drain_rate.get(model)
                        self.drain_rate[model] = rate if old is None else 0.7 * old + 0.3 * rate
                    last[model] = (now, done[model])

    def check(self, model: str, tenant: str) -> Rejection | None:
        """429 when ``model``'s engines' queue is deeper than its limit, for a tenant holding at
        least its fair share of the requests in flight (those below it still get in: no tenant
        takes more than its share while others wait). Retry-After: the excess over the drain rate."""
        limit = self.limits.get(model)
        depth = self.queue_depth.get(model, 0.0)
        if limit is None or depth <= limit:
            return None
        if tenant and self.admission.enabled:
            active = {n: t.active for n, t in self.admission.tenants.items() if t.active}
            mine = active.get(tenant, 0)
            if active and mine < sum(active.values()) / len(active):
                return None
        rate = max(self.drain_rate.get(model, 0.0), 0.1)
        wait = min(60.0, max(1.0, (depth - limit + 1) / rate))
        return answers.overloaded(model, depth, limit, rate, wait)
