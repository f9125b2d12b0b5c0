"""An async, streaming, OpenAI-compatible load generator (the core the benchmarks share).

Open loop (``rate``: requests per second, constant or Poisson) or closed loop (``concurrency``).
Per request: time to first token, inter-token gaps, end-to-end latency, output tokens (the
server's reported usage when it sends it, else the number of content chunks).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Result:
    start: float
    """Seconds since the run began, when the request was sent."""
    scheduled: float
    """When it should have been sent (open loop); the difference is the generator's own lag."""
    ok: bool = False
    status: int = 0
    error: str = ""
    ttft: float | None = None
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (vLLM's definition)."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


async def _one(session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str],
               t0: float, scheduled: float) -> Result:
    res = Result(start=time.perf_counter() - t0, scheduled=scheduled)
    stream = bool(body.get("stream"))
    try:
        async with session.post(url, json=body, headers=headers) as r:
            res.status = r.status
            if r.status != 200:
                res.error = f"http {r.status}"
                await r.read()
            elif not stream:
                data = await r.json()
                res.ttft = time.perf_counter() - t0 - res.start
                res.output_tokens = int(data.get("usage", {}).get("completion_tokens", 0))
                res.ok = True
            else:
                chunks = 0
                usage_tokens = None
                async for raw in r.content:
                    line = raw.strip()
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        res.error = f"stream {event['error'].get('code')}"
                        break
                    if event.get("usage"):
                        usage_tokens = event["usage"].get("completion_tokens")
                    choices = event.get("choices") or []
                    if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
                        now = time.perf_counter() - t0
                        if res.ttft is None:
                            res.ttft = now - res.start
                        res.chunk_times.append(now)
                        chunks += 1
                res.output_tokens = usage_tokens if usage_tokens is not None else chunks
                res.ok = not res.error and res.ttft is not None
    except (aiohttp.ClientError, TimeoutError) as exc:
        res.error = type(exc).__name__
    res.end = time.perf_counter() - t0
    return res


async def run(base_url: str, path: str, bodies: Sequence[dict[str, Any]], *, concurrency: int | None = None,
              rate: float | None = None, poisson: bool = False, api_key: str | None = None,
              seed: int = 0) -> list[Result]:
    """Send every body once; closed loop with ``concurrency`` or open loop at ``rate`` req/s."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency or rate")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + path
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        if concurrency is not None:
            queue = list(reversed(bodies))
            results: list[Result] = []

            async def worker() -> None:
                while queue:
                    body = queue.pop()
                    results.append(await _one(session, url, body, headers, t0, time.perf_counter() - t0))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return results
        assert rate is not None
        rng = random.Random(seed)
        tasks = []
        when = 0.0
        for body in bodies:
            delay = when - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(session, url, body, headers, t0, when)))
            when += rng.expovariate(rate) if poisson else 1.0 / rate
        return list(await asyncio.gather(*tasks))


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summarize(results: Sequence[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    span = (max(r.end for r in results) - min(r.start for r in results)) if results else 0.0
    ttft = [r.ttft for r in ok if r.ttft is not None]
    lat = [r.latency for r in ok]
    tpot = [t for r in ok if (t := r.tpot) is not None]
    itl = [x for r in ok for x in r.itls]
    lag = [r.start - r.scheduled for r in results]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
        "duration_s": span,
        "request_throughput": len(ok) / span if span else 0.0,
        "output_token_throughput": out_tokens / span if span else 0.0,
        **{f"ttft_p{q}_ms": pct(ttft, q) * 1e3 for q in (50, 90, 99)},
        **{f"latency_p{q}_ms": pct(lat, q) * 1e3 for q in (50, 90, 99)},
        **{f"tpot_p{q}_ms": pct(tpot, q) * 1e3 for q in (50, 90, 99)},
        **{f"itl_p{q}_ms": pct(itl, q) * 1e3 for q in (50, 90, 99)},
        "send_lag_p99_ms": pct(lag, 99) * 1e3,
        "ttft_mean_ms": statistics.fmean(ttft) * 1e3 if ttft else float("nan"),
    }
