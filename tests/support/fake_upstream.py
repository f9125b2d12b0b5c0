"""A fast fake OpenAI-compatible upstream for measuring the router and the load generator.

Never used as the engine of an end-to-end test: it exists to measure the layers in front of an
engine (router overhead, load-generator ceiling) and for fault injection.

    python -m tests.support.fake_upstream --port 9001 --model fake --tokens 16 --token-delay-ms 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web


def make_app(model: str, tokens: int, token_delay_s: float, ttft_s: float = 0.0,
             trace: str | None = None, capacity: int | None = None, adapters: tuple[str, ...] = ()) -> web.Application:
    state = {"requests": 0, "running": 0, "done": 0}
    trace_file = open(trace, "a", buffering=1) if trace else None  # lives as long as the app

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "fake", "parent": None},
                                        *({"id": a, "object": "model", "created": 0, "owned_by": "fake", "parent": model}
                                          for a in adapters)]}  # as vLLM lists its LoRA adapters
        )

    async def metrics(_: web.Request) -> web.Response:
        # with --capacity, requests beyond it count as waiting (they are served all the same)
        waiting = max(0, state["running"] - capacity) if capacity is not None else 0
        text = (
            f'vllm:num_requests_running{{model_name="{model}"}} {state["running"] - waiting}\n'
            f'vllm:num_requests_waiting{{model_name="{model}"}} {waiting}\n'
            f'vllm:request_success_total{{finished_reason="length",model_name="{model}"}} {state["done"]}\n'
            f'fake_requests_total {state["requests"]}\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def generate(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": {"message": "bad json", "type": "BadRequestError", "code": 400}}, status=400)
        state["requests"] += 1
        state["running"] += 1
        if trace_file is not None:  # arrival time of each prompt, to locate delays in front of the upstream
            trace_file.write(f"{time.time():.3f} {body.get('prompt', '')}\n")
        try:
            chat = request.path.endswith("/chat/completions")
            n = int(body.get("max_tokens") or body.get("max_completion_tokens") or tokens)
            created = int(time.time())
            rid = f"fake-{state['requests']}"
            if ttft_s:
                await asyncio.sleep(ttft_s)
            if request.headers.get("x-fake-cut"):  # fault: a fixed-length answer cut halfway
                resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "1000"})
                await resp.prepare(request)
                await resp.write(b'{"id": "cut", "choices": [')
                assert request.transport is not None
                request.transport.close()
                return resp
            if not body.get("stream"):
                if token_delay_s:
                    await asyncio.sleep(token_delay_s * n)
                text = "x" * n
                choice = (
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                    if chat
                    else {"index": 0, "text": text, "finish_reason": "length"}
                )
                return web.json_response(
                    {
                        "id": rid,
                        "object": "chat.completion" if chat else "text_completion",
                        "created": created,
                        "model": body.get("model", model),
                        "choices": [choice],
                        "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
                        "seen_headers": sorted(h.lower() for h in request.headers),
                    }
                )
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(n):
                if token_delay_s:
                    await asyncio.sleep(token_delay_s)
                delta = {"index": 0, "delta": {"content": "x"}} if chat else {"index": 0, "text": "x"}
                delta["finish_reason"] = "length" if i == n - 1 else None
                chunk = {
                    "id": rid,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": body.get("model", model),
                    "choices": [delta],
                }
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if (body.get("stream_options") or {}).get("include_usage"):  # as vLLM: a last chunk, no choices
                usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
                await resp.write(b"data: " + json.dumps({"id": rid, "object": "text_completion", "created": created,
                                                         "model": body.get("model", model), "choices": [],
                                                         "usage": usage}).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            state["running"] -= 1
            state["done"] += 1

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_post("/v1/completions", generate)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="fake")
    p.add_argument("--tokens", type=int, default=16, help="tokens per answer when the request sets no max_tokens")
    p.add_argument("--token-delay-ms", type=float, default=0.0)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--trace", help="append 'arrival-time prompt' per request to this file")
    p.add_argument("--capacity", type=int, help="report requests beyond this many as waiting")
    p.add_argument("--adapters", default="", help="comma-separated LoRA adapter names /v1/models lists")
    a = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(
        make_app(a.model, a.tokens, a.token_delay_ms / 1000, a.ttft_ms / 1000, a.trace, a.capacity,
                 tuple(x for x in a.adapters.split(",") if x)),
        host=a.host,
        port=a.port,
        access_log=None,
        print=None,
        backlog=2048,  # as uvicorn (vLLM's server): a burst of new connections must not be refused
    )


if __name__ == "__main__":
    main()
