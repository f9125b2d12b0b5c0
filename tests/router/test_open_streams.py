"""The endpoint holds 1,000 concurrent open streaming connections (fake upstream with slow tokens).

Bounded: two waves of 1,000 streams of 20 s each; every stream must finish with [DONE], and the
router's and gateway's memory after the second wave must not have grown past the first wave's peak
by more than a small margin (no per-connection leak). Peak RSS is printed.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.router.conftest import KEY, start_fakes

STREAMS = 1000
TOKENS = 20
TOKEN_DELAY_MS = 1000  # a 20 s stream: all 1,000 are open at the same time


def tree_rss(pid: int) -> int:
    try:
        p = psutil.Process(pid)
        return sum(c.memory_info().rss for c in [p, *p.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


async def wave(url: str) -> tuple[int, int, int]:
    """Returns (completed with [DONE], errors, peak concurrently open)."""
    ok = errors = open_now = peak = 0
    body = {"model": "slow", "prompt": "x", "max_tokens": TOKENS, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=120)) as s:
        async def one() -> None:
            nonlocal ok, errors, open_now, peak
            try:
                async with s.post(url + "/v1/completions", json=body, headers=headers) as r:
                    open_now += 1
                    peak = max(peak, open_now)
                    data = await r.read()
                    open_now -= 1
                    if r.status == 200 and data.endswith(b"data: [DONE]\n\n") and b'"error"' not in data:
                        ok += 1
                    else:
                        errors += 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
        await asyncio.gather(*(one() for _ in range(STREAMS)))
    return ok, errors, peak


@pytest.mark.timeout(300)
def test_thousand_concurrent_streams(tmp_path: Path) -> None:
    fakes = start_fakes(tmp_path, ("slow",), KEY)
    try:
        fakes.add_upstream("slow", "--token-delay-ms", str(TOKEN_DELAY_MS))
        fe = fakes.frontend
        assert fe.router_proc is not None and fe.gateway_proc is not None
        pids = {"router": fe.router_proc.pid, "gateway": fe.gateway_proc.pid, "launcher": os.getpid()}
        peaks = dict.fromkeys(pids, 0)
        baseline = {k: tree_rss(p) for k, p in pids.items()}
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.25):
                for k, p in pids.items():
                    peaks[k] = max(peaks[k], tree_rss(p))

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.monotonic()
        first = asyncio.run(wave(fakes.url))
        after_first = {k: tree_rss(p) for k, p in pids.items()}
        first_peaks = dict(peaks)
        second = asyncio.run(wave(fakes.url))
        after_second = {k: tree_rss(p) for k, p in pids.items()}
        sampling.set()
        t.join()
        elapsed = time.monotonic() - t0
    finally:
        fakes.stop()
    mib = 1024 * 1024
    for name in pids:
        print(f"\n{name:<8} RSS baseline {baseline[name] / mib:6.1f} MiB  peak {peaks[name] / mib:6.1f} MiB  "
              f"after wave 1 {after_first[name] / mib:6.1f}  after wave 2 {after_second[name] / mib:6.1f}")
    print(f"waves: {first}, {second} (ok, errors, peak open); {elapsed:.0f} s")
    for ok, errors, peak in (first, second):
        assert (ok, errors) == (STREAMS, 0)
        assert peak == STREAMS, "the streams were not all open at once"
    for name in ("router", "gateway"):
        # The second wave reuses what the first allocated: no growth beyond 10% + 8 MiB of the first peak.
        assert peaks[name] <= first_peaks[name] * 1.10 + 8 * mib, name
