"""Fill in the middle through the endpoint on real engines: ``suffix`` rendered per family inside the
engine (each marker one special-token id, the ids the published tokenizers give where the catalog
knows them), streamed and not, a list of prompts, Tabby's raw body, vLLM's own refusals, and the
gateway's 400 for the models that do not fill."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from codefleet.catalog import CATALOG
from codefleet.fim import get_format
from codefleet.runtime.local import LocalFleet
from tests.e2e.conftest import API_KEY

pytestmark = pytest.mark.e2e

#: The e2e fleet's models that fill, with their catalog seed (the published tokenizer's ids).
FILLING = {"granite-code-tiny": "ibm-granite/granite-3b-code-instruct-128k",
           "starcoder-alpaca-tiny": "GeorgiaTechResearchInstitute/starcoder-gpteacher-code-instruct",
           "stable-code-tiny": "stabilityai/stable-code-instruct-3b"}
REFUSING = ["granite-moe-tiny", "codefuse-tiny", "smollm2-135m-instruct"]
PREFIX = "def area(r: float) -> float:\n    return "
SUFFIX = "\n\n\nprint(area(2.0))\n"


def client(fleet: LocalFleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key=API_KEY, max_retries=0)


def model_ref(fleet: LocalFleet, model: str) -> str:
    return next(r.plan.model_ref for r in fleet.replicas if r.plan.name == model)


def test_models_say_which_take_a_suffix(fleet: LocalFleet) -> None:
    listed = {m.id: (m.model_extra or {}).get("fim") for m in client(fleet).models.list()}
    assert {m: listed[m] for m in FILLING} == dict.fromkeys(FILLING, "starcoder")
    assert all(listed[m] is None for m in REFUSING)


@pytest.mark.parametrize("model", sorted(FILLING))
def test_the_engine_receives_the_fill_prompt_with_each_marker_one_special_token(fleet: LocalFleet, model: str) -> None:
    r = client(fleet).completions.create(model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=4, temperature=0,
                                         extra_body={"return_token_ids": True})
    ids = r.choices[0].model_extra["prompt_token_ids"]  # type: ignore[index]
    tokenizer = AutoTokenizer.from_pretrained(model_ref(fleet, model))
    fim = get_format("starcoder")
    rendered = fim.render(PREFIX, SUFFIX)
    assert ids == tokenizer(rendered)["input_ids"]
    assert r.usage is not None and r.usage.prompt_tokens == len(ids)  # usage counts the rendered prompt
    marker = {t: tokenizer.convert_tokens_to_ids(t) for t in fim.markers}
    assert ids[0] == marker["<fim_prefix>"] and ids[-1] == marker["<fim_middle>"]
    assert ids.count(marker["<fim_suffix>"]) == 1
    assert all(i in tokenizer.all_special_ids for i in marker.values())
    # the published tokenizer's ids, where the catalog has them (StarCoder's 1, 2, 3)
    for token, real in CATALOG[FILLING[model]].fim_token_ids.items():
        assert marker[token] == real, (token, marker[token], real)
    # the prefix and the suffix are the same ids as when tokenized alone (no marker was split or merged)
    assert ids[1:ids.index(marker["<fim_suffix>"])] == tokenizer(PREFIX)["input_ids"]


def test_a_fill_streams_and_a_list_of_prompts_fills_each(fleet: LocalFleet) -> None:
    c = client(fleet)
    chunks = list(c.completions.create(model="granite-code-tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=6,
                                       temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert any(ch.choices and ch.choices[0].finish_reason in ("stop", "length") for ch in chunks)
    many = c.completions.create(model="granite-code-tiny", prompt=[PREFIX, "class A:\n    "], suffix=SUFFIX,
                                max_tokens=3, temperature=0)
    assert sorted(ch.index for ch in many.choices) == [0, 1]


def test_vllm_refuses_what_it_refuses_with_a_suffix(fleet: LocalFleet) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(fleet).completions.create(model="granite-code-tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=2,
                                         echo=True)
    assert "Echo is unsupported with suffix" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client(fleet).completions.create(model="granite-code-tiny", prompt=[1, 2, 3], suffix=SUFFIX, max_tokens=2)
    assert "suffix requires text prompt" in str(err.value)


@pytest.mark.parametrize("model", REFUSING)
def test_a_model_that_does_not_fill_answers_400_naming_those_that_do(fleet: LocalFleet, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(fleet).completions.create(model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=2)
    body = err.value.body
    assert isinstance(body, dict) and body["param"] == "suffix" and body["code"] == "fim_not_supported"
    assert f"`{model}` does not fill in the middle" in body["message"]
    assert all(m in body["message"] for m in FILLING)


def test_tabbys_openai_completion_body_is_served(fleet: LocalFleet) -> None:
    """The body Tabby's `openai/completion` kind posts (crates/http-api-bindings/src/completion/openai.rs):
    model, prompt, suffix, max_tokens, temperature, stream (always true), presence_penalty; no stop."""
    body = {"model": "starcoder-alpaca-tiny", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8,
            "temperature": 0.1, "stream": True, "presence_penalty": 0.0}
    events = []
    with httpx.stream("POST", fleet.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert all("choices" in p for p in parsed)
    assert parsed[-1]["choices"][0]["finish_reason"] in ("stop", "length")
