"""Prompt-format families: chat template, the tokens that end a turn, stop strings."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class Family:
    """How one family of models formats a conversation and where generation must stop."""

    name: str
    #: File name under chat_templates/.
    template: str
    #: Special tokens that end an assistant turn. Sent to vLLM as ``stop_token_ids``
    #: (vLLM drops special tokens from the text before it matches stop strings).
    stop_tokens: tuple[str, ...]
    #: Stop strings, matched on the generated text.
    stop_strings: tuple[str, ...]
    #: Special tokens of the format (used to build demo tokenizers).
    special_tokens: tuple[str, ...]
    bos_token: str | None
    eos_token: str
    #: Where the format and its stops come from.
    source: str

    def template_path(self) -> Path:
        return chat_template_path(self.template)


def chat_template_path(name: str) -> Path:
    path = resources.files("codefleet.chat_templates").joinpath(name)
    return Path(str(path))


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="granite-code",
            template="granite-code.jinja",
            stop_tokens=("<|endoftext|>",),
            stop_strings=("System:", "Question:", "Answer:"),
            # StarCoder's first five, in its order (ids 0-4: codefleet.catalog's fim_token_ids)
            special_tokens=("<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"),
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            source="ibm-granite/granite-3b-code-instruct-128k tokenizer_config.json; "
            "stop strings from IBM's Ollama packaging",
        ),
        Family(
            name="granite",
            template="granite.jinja",
            stop_tokens=("<|end_of_text|>",),
            stop_strings=(),
            special_tokens=(
                "<|end_of_text|>",
                "<|start_of_role|>",
                "<|end_of_role|>",
                "<|tool_call|>",
            ),
            bos_token="<|end_of_text|>",
            eos_token="<|end_of_text|>",
            source="ibm-granite/granite-3.0-1b-a400m-instruct tokenizer_config.json",
        ),
        Family(
            name="chatml",
            template="chatml.jinja",
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
            stop_strings=(),
            # and Stable Code's fill markers (stable-code-3b card)
            special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fim_prefix>", "<fim_middle>",
                            "<fim_suffix>"),
            bos_token=None,
            eos_token="<|endoftext|>",
            source="stabilityai/stable-code-instruct-3b tokenizer_config.json and demo app",
        ),
        Family(
            name="alpaca",
            template="alpaca.jinja",
            stop_tokens=("<|endoftext|>",),
            stop_strings=("\n### Instruction:",),
            # StarCoder's first five, in its order (the StarCoder GPTeacher fine-tune keeps its tokenizer)
            special_tokens=("<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"),
            bos_token=None,
            eos_token="<|endoftext|>",
            source="stanford_alpaca train.py PROMPT_DICT; the ### Instruction: stop is "
            "common Alpaca practice",
        ),
        Family(
            name="codefuse",
            template="codefuse.jinja",
            stop_tokens=("</s>",),
            stop_strings=(),
            special_tokens=("<s>", "</s>", "<unk>"),
            bos_token="<s>",
            eos_token="</s>",
            source="codefuse-ai/CodeFuse-CodeLlama-34B model card (prompt format section)",
        ),
    )
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None
