"""An async, streaming, OpenAI-compatible load generator (the core the benchmarks share).

Open loop (``rate``: requests per second, constant or Poisson) or closed loop (``concurrency``).
Per request: time to first token, inter-token gaps, end-to-end latency, output tokens (the
server's reported usage when it sends it, else the number of content chunks), the generated text.

Definitions (the same as vLLM's ``vllm bench serve``):
* TTFT: from sending the request to the first chunk carrying a choice, even with empty text
  (non-streaming: to the whole answer).
* TPOT: (latency - TTFT) / (output tokens - 1): the first token is excluded.
* ITL: the gaps between consecutive such chunks (a chunk may carry more than one token).
* latency: to the end of the stream ([DONE]); vLLM stops its clock at the last token chunk, a
  difference of the final usage chunk's and [DONE]'s transfer (microseconds on loopback).
* send lag: when the request was actually sent minus when the arrival schedule said (open loop).
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
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
    input_tokens: int | None = None
    model: str = ""
    text: str = ""

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
    res = Result(start=time.perf_counter() - t0, scheduled=scheduled, model=str(body.get("model", "")))
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
                usage = data.get("usage") or {}
                res.output_tokens = int(usage.get("completion_tokens", 0))
                res.input_tokens = usage.get("prompt_tokens")
                choice = (data.get("choices") or [{}])[0]
                res.text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
                res.ok = True
            else:
                chunks = 0
                usage_tokens = None
                parts: list[str] = []
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
                        res.input_tokens = event["usage"].get("prompt_tokens")
                    choices = event.get("choices")
                    if choices:
                        # A chunk with choices is a token event even when its text is empty (a special
                        # token, or bytes the detokenizer holds back), as vllm bench serve counts it.
                        now = time.perf_counter() - t0
                        if res.ttft is None:
                            res.ttft = now - res.start
                        res.chunk_times.append(now)
                        parts.append(choices[0].get("text") or (choices[0].get("delta") or {}).get("content") or "")
                        chunks += 1
                res.text = "".join(parts)
                res.output_tokens = usage_tokens if usage_tokens is not None else chunks
                res.ok = not res.error and res.ttft is not None
    except (aiohttp.ClientError, TimeoutError) as exc:
        res.error = type(exc).__name__
    res.end = time.perf_counter() - t0
    return res


async def run(base_url: str, path: str, bodies: Sequence[dict[str, Any]], *, concurrency: int | None = None,
              rate: float | None = None, poisson: bool = False, api_key: str | None = None,
              seed: int = 0, on_done: Callable[[Result], None] | None = None,
              paths: Sequence[str] | None = None) -> list[Result]:
    """Send every body once; closed loop with ``concurrency`` or open loop at ``rate`` req/s.

    ``paths``: a path per body (mixed chat and completions); ``on_done`` is called as each finishes.
    """
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency or rate")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = base_url.rstrip("/")
    urls = [base + p for p in paths] if paths is not None else [base + path] * len(bodies)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=600)

    async def one(i: int, t0: float, scheduled: float) -> Result:
        res = await _one(session, urls[i], bodies[i], headers, t0, scheduled)
        if on_done is not None:
            on_done(res)
        return res

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        if concurrency is not None:
            order = list(reversed(range(len(bodies))))
            results: list[Result] = []

            async def worker() -> None:
                while order:
                    i = order.pop()
                    results.append(await one(i, t0, time.perf_counter() - t0))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return results
        assert rate is not None
        rng = random.Random(seed)
        schedule = []
        when = 0.0
        for _ in bodies:
            schedule.append(when)
            when += rng.expovariate(rate) if poisson else 1.0 / rate
        tasks = []
        for i, at in enumerate(schedule):
            while (delay := at - (time.perf_counter() - t0)) > 0:
                # Sleep to just before the arrival, then yield in a loop (asyncio.sleep alone is
                # ~1 ms coarse); the event loop serves the requests in flight meanwhile.
                await asyncio.sleep(delay - 0.0003 if delay > 0.0005 else 0)
            tasks.append(asyncio.create_task(one(i, t0, at)))
        return list(await asyncio.gather(*tasks))


def run_sync(*args: Any, **kwargs: Any) -> list[Result]:
    """``run`` on a uvloop event loop (about twice the sending rate of asyncio's default loop)."""
    import uvloop

    # The cyclic garbage collector's full passes stall the loop for tens of milliseconds once
    # thousands of results are alive; nothing here makes cycles worth collecting mid-run.
    gc.collect()
    gc.disable()
    try:
        return uvloop.run(run(*args, **kwargs))
    finally:
        gc.enable()


def pct(values: Sequence[float], q: float) -> float:
    """Percentile with linear interpolation between closest ranks (numpy's default, as vLLM reports)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def meets(r: Result, slos: dict[str, float]) -> bool:
    """Whether a request met every SLO (milliseconds; keys ttft, tpot, e2el)."""
    if not r.ok:
        return False
    got = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.latency}
    return all(got[k] is None or got[k] * 1e3 <= v for k, v in slos.items())  # type: ignore[operator]


def summarize(results: Sequence[Result], slos: dict[str, float] | None = None) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    span = (max(r.end for r in results) - min(r.start for r in results)) if results else 0.0
    ttft = [r.ttft for r in ok if r.ttft is not None]
    lat = [r.latency for r in ok]
    tpot = [t for r in ok if (t := r.tpot) is not None]
    itl = [x for r in ok for x in r.itls]
    lag = [r.start - r.scheduled for r in results]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_tokens or 0 for r in ok)
    out: dict[str, Any] = {
        "requests": len(results),
        "ok": len(ok),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
        "duration_s": span,
        "request_throughput": len(ok) / span if span else 0.0,
        "output_token_throughput": out_tokens / span if span else 0.0,
        "total_token_throughput": (out_tokens + in_tokens) / span if span else 0.0,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        **{f"ttft_p{q}_ms": pct(ttft, q) * 1e3 for q in (50, 90, 99)},
        **{f"latency_p{q}_ms": pct(lat, q) * 1e3 for q in (50, 90, 99)},
        **{f"tpot_p{q}_ms": pct(tpot, q) * 1e3 for q in (50, 90, 99)},
        **{f"itl_p{q}_ms": pct(itl, q) * 1e3 for q in (50, 90, 99)},
        "send_lag_p50_ms": pct(lag, 50) * 1e3,
        "send_lag_p99_ms": pct(lag, 99) * 1e3,
        "send_lag_max_ms": max(lag) * 1e3 if lag else float("nan"),
        "ttft_mean_ms": statistics.fmean(ttft) * 1e3 if ttft else float("nan"),
        "tpot_mean_ms": statistics.fmean(tpot) * 1e3 if tpot else float("nan"),
        "itl_mean_ms": statistics.fmean(itl) * 1e3 if itl else float("nan"),
    }
    if slos:
        good = sum(meets(r, slos) for r in results)
        out["slos_ms"] = dict(slos)
        out["good_requests"] = good
        out["goodput"] = good / span if span else 0.0
    return out
