"""Speculative decoding on the trained model, through the endpoint with the official client.

The e2e fleet serves SmolLM2-135M-Instruct twice: ``smollm2-135m-instruct`` without speculation
and ``smollm2-135m-speculative`` with n-gram speculation (tests/e2e/fleet.yaml). Speculation must
not change a greedy answer: vLLM's rejection sampler emits the target model's argmax at every
position (vllm/v1/sample/rejection_sampler.py), so the only allowed difference is a floating-point
near-tie (the verify pass computes 1+k positions at once; vLLM's docs: "lossless up to the
precision limits of hardware numerics"), which the test checks with the plain engine's own top-2
log-probabilities at the first differing token. Whether speculation happened is read from the
engine's counters (vllm:spec_decode_*), never from latency.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from codefleet.cli import main as cli_main
from codefleet.runtime.local import LocalFleet
from codefleet.status import engine_look
from codefleet.tune_workloads import chat, edits
from tests.e2e.conftest import API_KEY

pytestmark = pytest.mark.e2e

PLAIN = "smollm2-135m-instruct"
SPECULATIVE = "smollm2-135m-speculative"
#: The widest log-probability gap between the top two tokens that counts as a tie (nats).
TIE = 0.1


def _client(fleet: LocalFleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key=API_KEY, max_retries=0)


def _counters(fleet: LocalFleet) -> tuple[float, float]:
    (r,) = [r for r in fleet.replicas if r.plan.name == SPECULATIVE]
    look = engine_look(httpx.get(r.url + "/metrics", timeout=10).text)
    return look.spec_accepted or 0.0, look.spec_draft_tokens or 0.0


def _tie_at_first_difference(spec_text: str, content: list[Any]) -> str | None:
    """None if ``spec_text`` follows the plain answer's tokens (``content``: their logprobs) up to a
    point where the plain engine's top two tokens were within TIE and the speculating engine took
    the second; else what is wrong."""
    pos = 0
    for i, tok in enumerate(content):
        if spec_text.startswith(tok.token, pos):
            pos += len(tok.token)
            continue
        top = tok.top_logprobs
        if len(top) >= 2 and spec_text.startswith(top[1].token, pos) and top[0].logprob - top[1].logprob <= TIE:
            return None
        alts = [(t.token, round(t.logprob, 3)) for t in top]
        return f"token {i} at char {pos}: plain {tok.token!r}, speculative {spec_text[pos:pos + 12]!r}, top {alts}"
    return None if pos == len(spec_text) else f"speculative text is longer: {spec_text[pos:pos + 40]!r}"


def test_greedy_answers_are_the_same_with_speculation(fleet: LocalFleet) -> None:
    c = _client(fleet)
    prompts = edits(4, offset=100) + chat(2, offset=7)
    accepted0, drafted0 = _counters(fleet)
    same, ties = 0, []
    for messages in prompts:
        plain = c.chat.completions.create(model=PLAIN, messages=messages, max_tokens=96, temperature=0,  # type: ignore[arg-type]
                                          logprobs=True, top_logprobs=2)
        spec = c.chat.completions.create(model=SPECULATIVE, messages=messages, max_tokens=96,  # type: ignore[arg-type]
                                         temperature=0)
        a, b = plain.choices[0].message.content or "", spec.choices[0].message.content or ""
        if a == b:
            same += 1
            assert plain.usage and spec.usage and plain.usage.completion_tokens == spec.usage.completion_tokens
            continue
        assert plain.choices[0].logprobs and plain.choices[0].logprobs.content
        problem = _tie_at_first_difference(b, plain.choices[0].logprobs.content)
        assert problem is None, f"speculation changed a greedy answer: {problem}"
        ties.append(messages[0]["content"][:60])
    accepted, drafted = (x - y for x, y in zip(_counters(fleet), (accepted0, drafted0), strict=True))
    print(f"\n{same}/{len(prompts)} identical, {len(ties)} differ at a near-tie; "
          f"engine: {accepted:.0f}/{drafted:.0f} draft tokens accepted")
    assert same >= len(prompts) - 1, ties
    # the edits copy their input: n-gram lookup proposes, and most of it is accepted (the scenario
    # measured 63-83% for this setting on this workload, bfloat16)
    assert drafted > 100 and accepted / drafted > 0.5, (accepted, drafted)


def test_streaming_with_speculation_is_the_same_answer(fleet: LocalFleet) -> None:
    c = _client(fleet)
    (messages,) = edits(1, offset=120)
    whole = c.chat.completions.create(model=SPECULATIVE, messages=messages, max_tokens=80, temperature=0)  # type: ignore[arg-type]
    pieces, chunks, usage, finish = [], 0, None, None
    for chunk in c.chat.completions.create(model=SPECULATIVE, messages=messages, max_tokens=80, temperature=0,  # type: ignore[arg-type]
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices:
            chunks += 1
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and whole.usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert chunks > 5


def test_what_vllm_refuses_with_speculation_is_a_clear_400(fleet: LocalFleet) -> None:
    c = _client(fleet)
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=SPECULATIVE, messages=msg, max_tokens=4, logit_bias={"42": 5})  # type: ignore[arg-type]
    assert "speculative decoding" in str(exc.value)
    ok = c.chat.completions.create(model=PLAIN, messages=msg, max_tokens=4, logit_bias={"42": 5})  # type: ignore[arg-type]
    assert ok.choices


def test_status_shows_the_acceptance_rate(fleet: LocalFleet, capsys: pytest.CaptureFixture[str]) -> None:
    _client(fleet).chat.completions.create(model=SPECULATIVE, messages=edits(1, offset=130)[0],  # type: ignore[arg-type]
                                           max_tokens=48, temperature=0)
    assert cli_main(["status", "--run-dir", str(fleet.run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith(SPECULATIVE + " "))
    assert "speculative decoding:" in lines[at + 1] and "of draft tokens accepted" in lines[at + 1], lines[at:at + 3]
    plain = next(i for i, ln in enumerate(lines) if ln.startswith(PLAIN + " "))
    assert "speculative" not in lines[plain + 1]


def test_tune_measures_and_prints_a_fragment(tmp_path: Path) -> None:
    """`codefleet tune` on the trained model: one engine per candidate, the engines' own counters."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text("defaults: {gpu: cpu, cpu_kv_cache_gib: 1}\nmodels:\n"
                        "  - name: t\n    source: demo://smollm2-135m-instruct\n    max_model_len: 2048\n")
    out = tmp_path / "tune.json"
    r = subprocess.run([sys.executable, "-m", "codefleet.cli", "tune", str(manifest), "--candidate", "off",
                        "--candidate", "ngram:4:2:4", "--workload", "edits", "--concurrency", "1", "--requests", "2",
                        "--max-tokens", "64", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    fragment = r.stdout[r.stdout.index("# codefleet tune:"):].split("\nresults:")[0]
    (model,) = yaml.safe_load(fragment)["models"]
    cells = {c["candidate"]: c for c in json.loads(out.read_text())["models"]["t"]["cells"]}
    assert set(cells) == {"off", "ngram k4 2-4"}
    assert cells["off"]["draft_tokens"] == 0 and cells["off"]["ok"] == 2
    assert cells["ngram k4 2-4"]["draft_tokens"] > 0 and cells["ngram k4 2-4"]["accepted_tokens"] > 0
    winner = json.loads(out.read_text())["models"]["t"]["winner"]
    assert model == {"name": "t", "speculative": winner["speculative"] or False}
