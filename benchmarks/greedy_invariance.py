"""Does speculation change greedy answers, and does batching without speculation do the same?

    python -m benchmarks.greedy_invariance --dtype bfloat16 [--dtype float32] [--out FILE]

Per dtype, two engines of the trained model (codefleet.tune's candidate engines: off and n-gram
k4 2-4), 14 prompts (8 code edits, 6 chat; codefleet.tune_workloads), greedy, 96 tokens:

1. off alone vs n-gram alone: the same prompt, each engine answering one request at a time;
   at the first differing token, the plain engine's top-2 log-probabilities (the gap, in nats).
2. off alone vs off with 4 requests at once: no speculation, only the batch shape changes.

If (2) differs as often as (1), what changes the text is the arithmetic of the batch shape (the
verify pass runs 1+k positions like a batch does), not the speculation's accept/reject rule.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import tempfile
from pathlib import Path
from typing import Any

import openai

from codefleet.manifest import parse
from codefleet.planner import plan_fleet
from codefleet.tune import candidate_engine, parse_candidate
from codefleet.tune_workloads import chat, edits


def _first_difference(spec: str, content: list[Any]) -> dict[str, Any]:
    pos = 0
    for i, tok in enumerate(content):
        if spec.startswith(tok.token, pos):
            pos += len(tok.token)
            continue
        top = [(t.token, t.logprob) for t in tok.top_logprobs]
        return {"token": i, "plain": tok.token, "other": spec[pos:pos + 12], "top2": top,
                "gap_nats": top[0][1] - top[1][1] if len(top) > 1 else None}
    return {"token": len(content), "plain": "", "other": spec[pos:pos + 12], "top2": [], "gap_nats": None}


def measure(dtype: str, logs: Path) -> dict[str, Any]:
    text = (f"defaults: {{gpu: cpu, cpu_kv_cache_gib: 1}}\nmodels:\n  - name: t\n"
            f"    source: demo://smollm2-135m-instruct\n    max_model_len: 2048\n    dtype: {dtype}\n")
    plan = plan_fleet(parse(text, logs / "m.yaml")).models[0]
    prompts = edits(8, offset=100) + chat(6, offset=7)
    with candidate_engine(plan, parse_candidate("off"), logs, enforce_eager=True, timeout=600, say=print) as u1, \
         candidate_engine(plan, parse_candidate("ngram:4:2:4"), logs, enforce_eager=True, timeout=600, say=print) as u2:
        plain, spec = (openai.OpenAI(base_url=u + "/v1", api_key="-", max_retries=0) for u in (u1, u2))
        alone = [plain.chat.completions.create(model="t", messages=m, max_tokens=96, temperature=0,  # type: ignore[arg-type]
                                               logprobs=True, top_logprobs=2) for m in prompts]
        speculated = [spec.chat.completions.create(model="t", messages=m, max_tokens=96, temperature=0)  # type: ignore[arg-type]
                      for m in prompts]
        with cf.ThreadPoolExecutor(4) as pool:
            batched = list(pool.map(lambda m: plain.chat.completions.create(
                model="t", messages=m, max_tokens=96, temperature=0), prompts))  # type: ignore[arg-type]
    out: dict[str, Any] = {"dtype": dtype, "prompts": len(prompts)}
    for name, others in (("speculation", speculated), ("batch_of_4", batched)):
        diffs = []
        for a, b in zip(alone, others, strict=True):
            ta, tb = a.choices[0].message.content or "", b.choices[0].message.content or ""
            if ta != tb:
                diffs.append(_first_difference(tb, a.choices[0].logprobs.content or []))  # type: ignore[union-attr]
        out[name] = {"identical": len(prompts) - len(diffs), "differences": diffs}
        gaps = [round(d["gap_nats"], 3) for d in diffs if d["gap_nats"] is not None]
        print(f"{dtype}: off alone vs {name}: {len(prompts) - len(diffs)}/{len(prompts)} identical; "
              f"top-2 gap at the first difference (nats): {gaps}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.greedy_invariance", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", action="append", choices=["bfloat16", "float32"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="codefleet-greedy-"))
    results = [measure(d, logs) for d in args.dtype or ["bfloat16", "float32"]]
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
