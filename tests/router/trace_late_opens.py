"""Locate the late opens of the 1,000-stream test: waves of 1,000 streams, each prompt unique; per
request when it was sent, when its response head came and when the fake upstream received it
(``--trace``). Through the endpoint, or straight to vllm-router (``direct``):

    python -m tests.router.trace_late_opens RUN_DIR SECONDS_PER_STREAM WAVES [direct]

Not a test (minutes of waves); the numbers are in benchmarks/README.md.
"""
import asyncio
import sys
import time
from pathlib import Path

import aiohttp

from tests.router.conftest import KEY, start_fakes

STREAMS = 1000


async def wave(url: str, w: int, tokens: int) -> tuple[float, dict[int, tuple[float, float]]]:
    t0 = time.time()
    opened: dict[int, tuple[float, float]] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=120)) as s:
        async def one(i: int) -> None:
            body = {"model": "slow", "prompt": f"w{w}-{i}", "max_tokens": tokens, "stream": True}
            sent = time.time()
            async with s.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
                opened[i] = (sent, time.time())
                await r.read()
        await asyncio.gather(*(one(i) for i in range(STREAMS)))
    return t0, opened


def main() -> None:
    run = Path(sys.argv[1])
    run.mkdir(parents=True, exist_ok=True)
    tokens, waves, direct = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:] == ["direct"]
    trace = run / "trace.txt"
    fakes = start_fakes(run, ("slow",), KEY)
    try:
        fakes.add_upstream("slow", "--token-delay-ms", "1000", "--trace", str(trace))
        url = fakes.frontend.router_url if direct else fakes.url
        for w in range(waves):
            t0, opened = asyncio.run(wave(url, w, tokens))
            arrived = {}
            for line in trace.read_text().splitlines():
                t, prompt = line.split(" ", 1)
                arrived[prompt] = float(t)
            late = [(i, round(sent - t0, 2), round(head - t0, 2), round(arrived.get(f"w{w}-{i}", 0) - t0, 2))
                    for i, (sent, head) in opened.items() if head - t0 > 5]
            print(f"wave {w}: late {len(late)} (request, sent, head, upstream arrival) {late}", flush=True)
    finally:
        fakes.stop()


if __name__ == "__main__":
    main()
