"""The demo fleet on real vLLM engines, driven through the one endpoint with the official openai SDK."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from codefleet.runtime.local import LocalFleet
from tests.e2e.conftest import API_KEY
from tests.goldens import CONVERSATIONS, GOLDEN

pytestmark = pytest.mark.e2e

TRAINED = "smollm2-135m-instruct"
MODELS = ["granite-code-tiny", "granite-moe-tiny", "stable-code-tiny", "starcoder-alpaca-tiny", "codefuse-tiny", TRAINED]
FAMILY = {"granite-code-tiny": "granite-code", "granite-moe-tiny": "granite", "stable-code-tiny": "chatml",
          "starcoder-alpaca-tiny": "alpaca", "codefuse-tiny": "codefuse", TRAINED: "chatml"}


def client(fleet: LocalFleet, model: str | None = None) -> openai.OpenAI:
    """A client of the fleet's endpoint (gateway -> vllm-router -> engines); every model behind one URL."""
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key=API_KEY, max_retries=0)


def replica(fleet: LocalFleet, model: str) -> Any:
    return next(r for r in fleet.replicas if r.plan.name == model)


def test_fleet_shape(fleet: LocalFleet) -> None:
    assert sorted(fleet.endpoints()) == sorted(MODELS)
    archs = {r.plan.family: r.plan.placement.tensor_parallel_size for r in fleet.replicas}
    assert archs["codefuse"] == 2


def test_models_list_is_openai_shaped(fleet: LocalFleet) -> None:
    page = client(fleet).models.list()
    assert sorted(m.id for m in page) == sorted(MODELS)
    assert all(m.object == "model" and m.owned_by == "codefleet" for m in page)
    assert client(fleet).models.retrieve("codefuse-tiny").id == "codefuse-tiny"


@pytest.mark.parametrize("model", MODELS)
def test_chat(fleet: LocalFleet, model: str) -> None:
    out = client(fleet, model).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write hello world."}], max_tokens=6, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage is not None and 1 <= out.usage.completion_tokens <= 6


@pytest.mark.parametrize("model", MODELS)
def test_chat_streaming(fleet: LocalFleet, model: str) -> None:
    stream = client(fleet, model).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Sort a list."}], max_tokens=6, stream=True,
        temperature=0)
    chunks = list(stream)
    assert chunks and all(c.model == model for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(text, str)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True])
def test_completions(fleet: LocalFleet, model: str, stream: bool) -> None:
    c = client(fleet, model)
    if stream:
        chunks = list(c.completions.create(model=model, prompt="def add(a, b):", max_tokens=5, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    else:
        out = c.completions.create(model=model, prompt="def add(a, b):", max_tokens=5, temperature=0)
        assert out.usage is not None and 1 <= out.usage.completion_tokens <= 5


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_server_renders_the_golden_prompt(fleet: LocalFleet, model: str, conversation: str) -> None:
    """vLLM's own rendering (POST /tokenize with messages) equals the tokenized golden string."""
    r = replica(fleet, model)
    resp = httpx.post(r.url + "/tokenize", json={"model": model, "messages": CONVERSATIONS[conversation],
                                                  "add_generation_prompt": True}, timeout=30)
    assert resp.status_code == 200, resp.text
    tokenizer = AutoTokenizer.from_pretrained(r.plan.model_ref)
    golden = GOLDEN[(FAMILY[model], conversation, True)]
    assert resp.json()["tokens"] == tokenizer(golden, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("model", MODELS)
def test_family_stop_token_ends_generation(fleet: LocalFleet, model: str) -> None:
    """Force each stop token of the family as the only allowed token (logit_bias is refused on a
    speculating engine, as stable-code-tiny is here): the server must stop on it."""
    r = replica(fleet, model)
    tokenizer = AutoTokenizer.from_pretrained(r.plan.model_ref)
    for token in r.plan.generation.stop_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        out = client(fleet, model).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=20,
            extra_body={"allowed_token_ids": [token_id]})
        assert out.choices[0].finish_reason == "stop", token
        assert out.usage is not None and out.usage.completion_tokens == 1


@pytest.mark.parametrize(("model", "role"), [("codefuse-tiny", "tool"), ("stable-code-tiny", "tool"),
                                             ("granite-code-tiny", "critic")])
def test_inexpressible_role_is_a_400(fleet: LocalFleet, model: str, role: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(fleet, model).chat.completions.create(
            model=model, messages=[{"role": role, "content": "x"}], max_tokens=2)  # type: ignore[misc,list-item]
    assert f"no role '{role}'" in str(info.value)


def test_alpaca_assistant_first_is_a_400(fleet: LocalFleet) -> None:
    with pytest.raises(openai.BadRequestError, match="must follow a user instruction"):
        client(fleet, "starcoder-alpaca-tiny").chat.completions.create(
            model="starcoder-alpaca-tiny", messages=[{"role": "assistant", "content": "x"}], max_tokens=2)


@pytest.mark.parametrize(("model", "expected"), [("codefuse-tiny", "{'temperature': 0.1, 'top_p': 0.95}"),
                                                 ("stable-code-tiny", "{'temperature': 0.5, 'top_k': 100, 'top_p': 0.95}")])
def test_card_sampling_defaults_are_the_servers_defaults(fleet: LocalFleet, model: str, expected: str) -> None:
    client(fleet, model).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=2)
    log = replica(fleet, model).log.read_text()
    line = next(ln for ln in log.splitlines() if "Default vLLM sampling parameters have been overridden" in ln)
    assert expected in line


@pytest.mark.parametrize("model", MODELS)
def test_kv_capacity_matches_the_plan(fleet: LocalFleet, model: str) -> None:
    """vLLM logs its KV cache size in tokens; the planner's figure must agree within 1%."""
    r = replica(fleet, model)
    match = re.search(r"KV cache size: ([\d,]+) tokens", r.log.read_text())
    assert match, "vLLM did not log its KV cache size"
    reported = int(match.group(1).replace(",", ""))
    assert reported == pytest.approx(r.plan.memory.kv_tokens, rel=0.01)


def test_smoke_passes_on_the_demo_fleet(fleet: LocalFleet) -> None:
    """`codefleet smoke` as an operator runs it after a deploy: every check of every model passes,
    each template recognised as the one the manifest gives the model."""
    manifest = Path(__file__).with_name("fleet.yaml")
    r = subprocess.run([sys.executable, "-m", "codefleet.cli", "smoke", fleet.url, "--manifest", str(manifest),
                        "--json"], env={**os.environ, "CODEFLEET_API_KEY": API_KEY}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["failed"] == 0 and report["unknown_model"]["ok"] is True
    seen = {m["model"]: {c["name"]: c for c in m["checks"]} for m in report["models"]}
    assert sorted(seen) == sorted(MODELS)
    for model, checks in seen.items():
        assert all(c["ok"] is True for c in checks.values()), (model, checks)
        assert {"chat", "chat stream", "completion", "completion stream", "template"} <= set(checks)
        assert checks["template"]["detail"] == f"the {FAMILY[model]} family's template"
        assert any(name.startswith("stop ") for name in checks), checks
        # Only the trained model is asked whether its answer makes sense (the stand-ins write noise).
        assert ("answer makes sense" in checks) == (model == TRAINED), checks
        # a fill where /v1/models names a format, the 400 for a suffix elsewhere (docs/fim.md)
        fills = model in ("granite-code-tiny", "stable-code-tiny", "starcoder-alpaca-tiny")
        assert ("fill (starcoder)" if fills else "fill refused") in checks, checks
    assert seen["granite-code-tiny"]["listed"]["detail"] == "2 ready replica(s)"
