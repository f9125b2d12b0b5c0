"""Prefix affinity: requests that share a long prompt prefix get the same key, so that
vllm-router's ``sticky_least_loaded`` sends them to the replica that already holds that prefix in
its KV cache; a new key is a new session, which the router places on the replica with the fewest.
When a model's ready replicas change, a consistent share of the keys is renamed (``jump_bucket``)
and so placed again: a replica that joins or comes back after a crash takes its share of the
prefixes already placed, not only of those seen after it came.

Why here and not in the router: vllm-router 0.1.17's ``cache_aware`` matches token ids, which it
asks every replica's render endpoint for on every request (one render per replica per request,
on the engine's own API server). Measured on this 2-core machine with the trained demo model,
that cost TTFT p50 2.8 s against round robin's 0.83 s on a no-shared-prefix control
(benchmarks/scenarios/prefix-routing/README.md). The gateway has the parsed body already; hashing
its text costs microseconds and no engine time.

How (in the manner of llm-d's approximate prefix index and of consistent hashing with bounded
loads, Mirrokni et al. 2018):

* The prompt's text (a chat's messages in order, role and content; a completion's prompt) is cut
  into chunks of ``chunk_chars`` characters, each hashed with the one before it, so a chunk's hash
  names the whole prefix up to it (vLLM's prefix cache hashes its KV blocks the same way).
* An index (least recently used, bounded) maps a chunk hash to the session key its prefix was
  sent with. A request takes the key of its longest indexed prefix when that prefix covers more
  than ``min_share`` of its chunks (a shared system prompt alone does not tie every conversation
  to one replica); else it starts a new key.
* Bounded load: a key with more requests in flight than ``spill`` x the model's requests in flight
  per ready replica (and at least 2) spills to a sibling key (``key~1``, ...), a new session the
  router places on the replica with the fewest: a hot prefix is copied onto more replicas as its
  load grows.

The key travels as ``x-session-id`` (the first header vllm-router's key lookup reads; a client's
own is replaced), prefixed with a tag of the model (the router keeps one session table for every
model). A prompt with nothing to keep together (shorter than one chunk, or token ids) takes, in
turn, the least busy of ``8 x replicas`` spread keys: without a key sticky_least_loaded sends every
such request to the same replica (measured with two fake upstreams), and a fresh key per request
would fill the router's session table. The spread keys are named with the count of ready replicas,
so all of them are placed again when it changes.

vllm-router's consistent_hash was measured as the alternative (``results/consistent_hash/`` of the
prefix-routing scenario): a key placed by hash instead of on the replica with the fewest, which
left the no-shared-prefix control's TTFT p50 at 1.33 s against round robin's 0.83 s (placement by
chance queues more) and put 6 of 8 conversations on one replica.

Known limit: placement is by the replicas' session counts, not their load, and the gateway does
not know which replica a key landed on; a hot key spills, but two warm keys on one replica are not
moved.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable, Iterable
from typing import Any

#: The header vllm-router's session lookup reads first (before x-user-id, ..., x-request-id).
SESSION_HEADER = b"x-session-id"


def prompt_text(payload: dict[str, Any]) -> str | None:
    """The text a request's prompt is rendered from, in order; None for token-id prompts."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):  # content parts: their text, in order
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(f"{m.get('role', '')}\x1f{content if isinstance(content, str) else ''}\x1e")
        return "".join(parts)
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    return None


#: Chunks hashed per request at most (512 KiB at 256 bytes a chunk: more than a 128K-token context;
#: a 32 MiB body would otherwise cost about 0.4 s of the gateway's one thread and flush the index).
MAX_CHUNKS = 2048


def chunk_hashes(text: str, chunk_chars: int) -> list[bytes]:
    """One hash per whole chunk (of the first ``MAX_CHUNKS``), each over the chunk and the hash before it."""
    out: list[bytes] = []
    h = b""
    step = chunk_chars  # bytes: the same cut for the same text, which is all that matters here
    data = text[:step * MAX_CHUNKS].encode("utf-8", "surrogatepass")[:step * MAX_CHUNKS]
    for i in range(0, len(data) - step + 1, step):
        h = hashlib.blake2b(h + data[i:i + step], digest_size=12).digest()
        out.append(h)
    return out


def jump_bucket(key: bytes, buckets: int) -> int:
    """The key's bucket in ``range(buckets)`` by jump consistent hashing (Lamping and Veach 2014,
    "A Fast, Minimal Memory, Consistent Hash Algorithm", arXiv:1406.2294): when ``buckets`` grows
    from n to n + 1, exactly the keys that land in the new bucket (1/(n + 1) of them) change.

    Sent with the key (and the bucket's generation, new each time the count grows into it), it
    renames that share of the keys when a model's ready replicas grow: a renamed key is a new
    session, which the router places on the replica with the fewest, so a replica that joins or
    comes back takes its share of the placed prefixes; the other keys keep their replica and its
    cache. (When a replica leaves, its keys are placed again by the router.)
    """
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    b, j = -1, 0
    while j < max(buckets, 1):
        b = j
        h = (h * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * (float(1 << 31) / float((h >> 33) + 1)))
    return b


class Affinity:
    """Session keys by prompt prefix, and each key's requests in flight (one per gateway process)."""

    def __init__(self, chunk_chars: int = 256, min_share: float = 0.5, spill: float = 1.25,
                 index_chunks: int = 200_000, count: Callable[[str, str], None] | None = None) -> None:
        self.chunk_chars = chunk_chars
        self.min_share = min_share
        self.spill = spill
        self.index_chunks = index_chunks
        self.index: collections.OrderedDict[tuple[str, bytes], bytes] = collections.OrderedDict()
        self.in_flight: collections.Counter[tuple[str, bytes]] = collections.Counter()
        self.model_in_flight: collections.Counter[str] = collections.Counter()
        self.tags: dict[str, bytes] = {}
        self.generations: dict[str, list[int]] = {}
        self.replicas_seen: dict[str, int] = {}
        self.turn: collections.Counter[str] = collections.Counter()
        """Per model: where the next look at the spread keys starts (ties go round)."""
        self.count = count or (lambda model, outcome: None)
        """Called per request with its outcome: ``prefix`` (an indexed prefix's key), ``new`` (a new
        key), ``spill`` (a sibling of a hot key), ``spread`` (no prefix to keep: a spread key)."""

    def choose(self, model: str, payload: dict[str, Any], replicas: int) -> bytes:
        """The request's session key as sent (counted in flight until ``done``): the model's tag, the
        key, its bucket among ``replicas`` (see ``jump_bucket``) and that bucket's generation."""
        key = self._choose(model, payload, replicas)
        bucket = jump_bucket(key, replicas)
        return self._tag(model) + key + b"@%d.%d" % (bucket, self._generation(model, replicas, bucket))

    def _generation(self, model: str, replicas: int, bucket: int) -> int:
        """How many times the model's ready replicas grew to include ``bucket``: each time, the keys
        of that bucket get names the router has not seen (its sessions live 10 minutes, so a count
        that comes back would otherwise bring back names still placed where they were before)."""
        gens = self.generations.setdefault(model, [])
        seen = self.replicas_seen.get(model, 0)
        if replicas > seen:
            gens += [0] * (replicas - len(gens))
            for b in range(seen, replicas):
                gens[b] += 1
        self.replicas_seen[model] = replicas
        return gens[bucket] if bucket < len(gens) else 0

    def _tag(self, model: str) -> bytes:
        tag = self.tags.get(model)
        if tag is None:
            tag = self.tags[model] = hashlib.blake2b(model.encode(), digest_size=4).hexdigest().encode() + b"."
        return tag

    def _choose(self, model: str, payload: dict[str, Any], replicas: int) -> bytes:
        text = prompt_text(payload)
        hashes = chunk_hashes(text, self.chunk_chars) if text else []
        if not hashes:  # nothing worth keeping together: the least busy of 8 x replicas spread keys
            n = 8 * max(replicas, 1)
            start = self.turn[model] % n
            self.turn[model] += 1
            # The replica count is in the name: when it changes, every spread key is new and placed
            # again, so a replica that joins or restarts takes its share at once.
            spread = min((b"~spread~%d/%d" % ((start + i) % n, n) for i in range(n)),
                         key=lambda k: self.in_flight[model, k])
            self._take(model, spread, "spread")
            return spread
        key: bytes | None = None
        matched = 0
        for h in hashes:
            k = self.index.get((model, h))
            if k is None:
                break
            key, matched = k, matched + 1
        for h in reversed(hashes[:matched]):  # the deepest first: a chain's root leaves the index last
            self.index.move_to_end((model, h))
        outcome = "prefix"
        if key is None or matched / len(hashes) <= self.min_share:
            key, outcome = hashes[-1].hex().encode(), "new"
        bound = max(2.0, self.spill * (self.model_in_flight[model] + 1) / max(replicas, 1))
        if self.in_flight[model, key] + 1 > bound:  # hot: the first of the key's family with room
            root = key.split(b"~", 1)[0]
            family = [root, *(root + b"~%d" % n for n in range(1, 64))]
            key = next((k for k in family if self.in_flight[model, k] + 1 <= bound), family[-1])
            outcome = "spill"
        self._remember(model, hashes[matched:], key)
        self._take(model, key, outcome)
        return key

    def _take(self, model: str, key: bytes, outcome: str) -> None:
        self.in_flight[model, key] += 1
        self.model_in_flight[model] += 1
        self.count(model, outcome)

    def done(self, model: str, tagged: bytes) -> None:
        key = tagged[len(self._tag(model)):].rsplit(b"@", 1)[0]
        self.in_flight[model, key] -= 1
        if self.in_flight[model, key] <= 0:
            del self.in_flight[model, key]
        self.model_in_flight[model] -= 1

    def _remember(self, model: str, hashes: Iterable[bytes], key: bytes) -> None:
        for h in hashes:
            self.index[model, h] = key
        while len(self.index) > self.index_chunks:
            self.index.popitem(last=False)
