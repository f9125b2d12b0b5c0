"""Prefix affinity's keys (launcher/codefleet/gateway/affinity.py), without a router."""

from __future__ import annotations

import random
import string

from codefleet.gateway.affinity import Affinity, chunk_hashes, jump_bucket, prompt_text

SYSTEM = {"role": "system", "content": "You are a coding assistant. " * 20}  # ~560 bytes, 2 chunks


def text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + " \n") for _ in range(n))


def chat(*contents: str, system: bool = True) -> dict[str, object]:
    msgs = [SYSTEM] if system else []
    roles = ["user", "assistant"]
    return {"messages": msgs + [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]}


def test_requests_about_one_file_share_a_key_and_other_files_do_not() -> None:
    a = Affinity()
    file_a, file_b = text(1, 3000), text(2, 3000)
    k1 = a.choose("m", chat(file_a + "\nexplain f"), 2)
    a.done("m", k1)
    k2 = a.choose("m", chat(file_a + "\nwrite a test for g"), 2)
    a.done("m", k2)
    k3 = a.choose("m", chat(file_b + "\nexplain f"), 2)
    assert k1 == k2 and k3 != k1


def test_a_shared_system_prompt_alone_does_not_tie_conversations_together() -> None:
    a = Affinity()
    keys = set()
    for i in range(4):
        k = a.choose("m", chat(text(10 + i, 800)), 2)
        assert k is not None
        a.done("m", k)
        keys.add(k)
    assert len(keys) == 4


def test_a_conversation_keeps_its_key_turn_after_turn() -> None:
    a = Affinity()
    opener = text(3, 2000)
    turns = [opener + "\nfirst question"]
    k0 = a.choose("m", chat(*turns), 2)
    for t in range(5):
        assert k0 is not None
        a.done("m", k0)
        turns += [text(100 + t, 200), f"question {t}"]
        assert a.choose("m", chat(*turns), 2) == k0


def test_a_hot_prefix_spills_to_sibling_keys_and_comes_back() -> None:
    a = Affinity(spill=1.25)
    hot = text(4, 3000)
    keys = [a.choose("m", chat(hot + f"\nq{i}"), 2) for i in range(8)]
    assert all(k is not None for k in keys)
    base = keys[0]
    assert base is not None
    # 8 in flight on 2 replicas: the bound is max(2, 1.25 x in flight / 2) at each choice
    assert 2 <= keys.count(base) < 8
    root = base.rsplit(b"@", 1)[0]
    assert {k.rsplit(b"@", 1)[0] for k in keys if k != base} <= {root + b"~1", root + b"~2"}
    for k in keys:
        a.done("m", k)
    assert not a.in_flight and a.model_in_flight["m"] == 0
    assert a.choose("m", chat(hot + "\nlater"), 2) == base


def test_short_or_token_prompts_take_the_least_busy_spread_key_and_the_index_is_bounded() -> None:
    outcomes: list[str] = []
    a = Affinity(index_chunks=1000, count=lambda model, outcome: outcomes.append(outcome))
    short = [a.choose("m", {"prompt": "def f(x):"}, 2), a.choose("m", {"prompt": [1, 2, 3] * 200}, 2)]
    more = [a.choose("m", {"prompt": "x"}, 2) for _ in range(30)]
    assert len(set(short + more)) == 16  # 8 x replicas keys, each taken twice while all are in flight
    assert all(b".~spread~" in k for k in short + more)
    for k in short + more:
        a.done("m", k)
    assert not a.in_flight
    for i in range(50):
        k = a.choose("m", {"prompt": text(1000 + i, 256 * 40)}, 2)
        a.done("m", k)
    assert len(a.index) <= 1000
    assert outcomes[:32] == ["spread"] * 32 and set(outcomes[32:]) == {"new"}


def test_the_index_is_per_model_and_text_is_cut_in_whole_chunks() -> None:
    a = Affinity()
    body = chat(text(5, 3000))
    # the router keeps one session table for all models: the same text gets a key per model
    assert a.choose("m1", body, 2) != a.choose("m2", body, 2)
    assert ("m1", chunk_hashes(prompt_text(body) or "", 256)[0]) in a.index
    assert len(chunk_hashes("x" * 511, 256)) == 1 and len(chunk_hashes("x" * 512, 256)) == 2
    assert prompt_text({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}) == "user\x1fhi\x1e"


def test_jump_buckets_move_only_the_keys_of_the_new_bucket() -> None:
    keys = [b"key-%d" % i for i in range(4000)]
    for n in (1, 2, 3, 5):
        before = [jump_bucket(k, n) for k in keys]
        after = [jump_bucket(k, n + 1) for k in keys]
        moved = [b for b, a in zip(before, after, strict=True) if a != b]
        assert all(0 <= b < n for b in before)
        assert {a for b, a in zip(before, after, strict=True) if a != b} == {n}  # only into the new one
        assert abs(len(moved) / len(keys) - 1 / (n + 1)) < 0.03, (n, len(moved))
        counts = [before.count(b) for b in range(n)]
        assert max(counts) - min(counts) < 0.1 * len(keys) / n + 40


def test_a_returning_replica_renames_a_share_of_the_placed_keys_and_every_spread_key() -> None:
    a = Affinity()
    files = [text(200 + i, 3000) for i in range(40)]

    def keys(replicas: int) -> list[bytes]:
        out = []
        for f in files:
            k = a.choose("m", chat(f + "\nexplain"), replicas)
            a.done("m", k)
            out.append(k)
        return out

    two, one, two_again = keys(2), keys(1), keys(2)
    renamed = [i for i, (x, y) in enumerate(zip(two, one, strict=True)) if x != y]
    assert 10 <= len(renamed) <= 30  # about half: the other half keep their key, replica and cache
    # back to two: the keys of the returning bucket get names the router has never seen (its sessions
    # outlive a short outage and would send the old names where they were); the rest keep theirs
    back = [i for i, (x, y) in enumerate(zip(one, two_again, strict=True)) if x != y]
    assert back == renamed and not {two_again[i] for i in back} & (set(two) | set(one))
    spread = {a.choose("m", {"prompt": "x"}, 2) for _ in range(16)}
    spread_one = {a.choose("m", {"prompt": "x"}, 1) for _ in range(8)}
    assert len(spread) == 16 and not spread & spread_one
