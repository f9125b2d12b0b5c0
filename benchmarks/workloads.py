"""Prompt workloads shared by the benchmarks and the tests."""

from __future__ import annotations

import random

_WORDS = ("def class return import yield lambda async await self value index count total result buffer "
          "parser token stream socket thread request response handler config schema router engine cache "
          "prefix tensor kernel batch queue worker replica model adapter").split()


def code_context(rng: random.Random, words: int) -> str:
    """A pseudo-code block of ``words`` words: a long shared prefix (a repository file, a system prompt)."""
    lines = []
    line: list[str] = []
    for _ in range(words):
        line.append(rng.choice(_WORDS))
        if len(line) >= 8:
            lines.append("    " + " ".join(line))
            line = []
    return "\n".join(lines + ["    " + " ".join(line)])


def shared_prefix_prompts(groups: int, per_group: int, prefix_words: int, seed: int = 0) -> list[tuple[int, str]]:
    """``groups`` long prefixes, ``per_group`` questions on each, interleaved group by group.

    Returns (group, prompt) in send order: round k sends the k-th question of every group, so a
    router that ignores prefixes scatters each group over the replicas.
    """
    rng = random.Random(seed)
    prefixes = [f"# file {seed}-{g}\n" + code_context(rng, prefix_words) for g in range(groups)]
    return [(g, f"{prefixes[g]}\n# question {k}: explain {rng.choice(_WORDS)}\n")
            for k in range(per_group) for g in range(groups)]
