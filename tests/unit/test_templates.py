from __future__ import annotations

import json
from typing import Any

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from codefleet.families import FAMILIES
from tests.goldens import A1, CARD_EXAMPLES, CONVERSATIONS, GOLDEN, INVALID, Q1, SYS


def render(family: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
           tools: list[dict[str, Any]] | None = None) -> str:
    """Render as transformers' apply_chat_template does (same Jinja environment)."""
    fam = FAMILIES[family]
    rendered, _ = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=fam.template_path().read_text(),
        add_generation_prompt=add_generation_prompt,
        bos_token=fam.bos_token or "",
        eos_token=fam.eos_token,
    )
    return str(rendered[0])


def test_every_family_has_goldens() -> None:
    assert {f for f, _, _ in GOLDEN} == set(FAMILIES)
    assert len(GOLDEN) == len(FAMILIES) * len(CONVERSATIONS) * 2


@pytest.mark.parametrize(("family", "conversation", "gen"), sorted(GOLDEN))
def test_golden(family: str, conversation: str, gen: bool) -> None:
    assert render(family, CONVERSATIONS[conversation], gen) == GOLDEN[(family, conversation, gen)]


@pytest.mark.parametrize(("family", "messages", "expected"), CARD_EXAMPLES, ids=[c[0] for c in CARD_EXAMPLES])
def test_model_card_example(family: str, messages: list[dict[str, Any]], expected: str) -> None:
    assert render(family, messages) == expected


#: The ChatML template of stabilityai/stable-code-instruct-3b (tokenizer_config.json), as published.
PUBLISHED_CHATML = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = 'You are a helpful assistant.' %}{% endif %}"
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 %}"
    "{{'<|im_start|>system\\n' + system_message + '<|im_end|>\\n'}}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("messages", [
    *CONVERSATIONS.values(),
    [{"role": "system", "content": SYS}],
    [{"role": "system", "content": SYS}, {"role": "user", "content": Q1}, {"role": "assistant", "content": A1}],
], ids=[*CONVERSATIONS, "system_only", "system_user_assistant"])
def test_chatml_renders_as_published(messages: list[dict[str, Any]], gen: bool) -> None:
    published, _ = render_jinja_template(conversations=[messages], chat_template=PUBLISHED_CHATML,
                                         add_generation_prompt=gen)
    assert render("chatml", messages, gen) == published[0]


def test_chatml_system_only_renders_no_system_block() -> None:
    assert render("chatml", [{"role": "system", "content": SYS}]) == "<|im_start|>assistant\n"


def test_granite_tools_block() -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"city": "string"}}}
    out = render("granite", [{"role": "user", "content": "Weather?"}], tools=[tool, tool])
    block = json.dumps(tool, indent=4)
    assert out == (
        "<|start_of_role|>available_tools<|end_of_role|>\n" + block + "\n\n" + block + "<|end_of_text|>\n"
        "<|start_of_role|>user<|end_of_role|>Weather?<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
    )


def test_granite_tool_roles() -> None:
    out = render("granite", [
        {"role": "user", "content": "q"},
        {"role": "assistant_tool_call", "content": "[{}]"},
        {"role": "tool_response", "content": "r1"},
        {"role": "tool", "content": "r2"},
    ], add_generation_prompt=False)
    assert out == (
        "<|start_of_role|>user<|end_of_role|>q<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|><|tool_call|>[{}]<|end_of_text|>\n"
        "<|start_of_role|>tool_response<|end_of_role|>r1<|end_of_text|>\n"
        "<|start_of_role|>tool_response<|end_of_role|>r2<|end_of_text|>\n"
    )


def test_alpaca_input_in_multi_turn() -> None:
    out = render("alpaca", [
        {"role": "user", "content": "Fix it."},
        {"role": "input", "content": "x = 1 +"},
        {"role": "assistant", "content": "x = 1 + 1"},
        {"role": "user", "content": "Explain."},
    ])
    assert out.startswith("Below is an instruction that describes a task, paired with an input")
    assert out.endswith("### Instruction:\nFix it.\n\n### Input:\nx = 1 +\n\n### Response:x = 1 + 1"
                        "\n\n### Instruction:\nExplain.\n\n### Response:")


@pytest.mark.parametrize(("family", "messages", "words"), INVALID, ids=[f"{i[0]}-{i[2]}" for i in INVALID])
def test_inexpressible_conversation_is_refused(family: str, messages: list[dict[str, Any]], words: str) -> None:
    with pytest.raises(Exception, match=words.replace("(", r"\(")):
        render(family, messages)
