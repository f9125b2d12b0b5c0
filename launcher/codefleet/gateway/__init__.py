"""The fleet's one OpenAI endpoint: a thin gate in front of vllm-router.

vllm-router (Rust, vLLM project) does the routing: per-model worker sets in IGW mode, the
load- and prefix-aware policy, retries and circuit breakers. It falls short of a public OpenAI
endpoint in a few places, measured on vllm-router 0.1.17:

* ``GET /v1/models`` answers ``{"models": [...]}``, not OpenAI's list shape;
  ``GET /v1/models/{id}`` answers 405;
* a request for an unknown model is forwarded to *some* worker (a 200 from another model);
* a request without ``model`` gets 503 "No available workers" (a 5xx for a client mistake);
* errors are plain text, not OpenAI's ``{"error": {...}}``;
* clients are not authenticated (``--api-key`` is what the router sends to workers);
* bodies are re-serialized through its own types, so a message the engine would refuse (a
  ``content`` that is a number) is accepted.

The gate closes exactly those gaps, enforces a public server's limits (header sizes, timeouts,
a connection cap, backpressure; nginx's defaults) and passes everything else to the router over
pooled keep-alive connections, streaming the answer back as it comes.

Modules, one concern each (imports run down this list, never up):

* ``config``: ``GatewayConfig`` (what the launcher or the chart writes); with ``metrics`` (the
  metric names), the only modules the rest of the package imports;
* ``wire``: HTTP/1.1 and SSE framing; ``answers``: every answer the gate gives itself;
* ``policy``: the decisions (keys, paths, body shapes) as plain functions; ``admission``:
  tenants' limits;
* ``http``: the client side, an HTTP/1.1 server protocol (llhttp via ``httptools`` on uvloop)
  with the limits; it talks to the gateway through ``http.Handler``;
* ``pool``: keep-alive connections to the router; ``upstream``: one forwarded exchange, which
  talks to the gateway through ``upstream.Host``;
* ``hold``: requests held for a model with no replica; ``shed``: overload shedding;
  ``workers``: the router's worker list;
* ``server``: the process (``python -m codefleet.gateway --config FILE``): the gate wired
  together, signals.

Why its own small HTTP server instead of a framework: see benchmarks/README.md (the endpoint).
"""
