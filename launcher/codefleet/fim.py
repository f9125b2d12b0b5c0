"""Fill in the middle: the prompt formats code models were trained to infill with.

An editor sends the text before the cursor as ``prompt`` and the text after it as ``suffix``
(OpenAI's legacy completions field). vLLM 0.32 renders ``suffix`` only where the model's renderer
implements ``render_completion_suffix`` (only DeepSeek-V4's does, ``vllm/renderers/``); codefleet
gives that hook each FIM model's format (``request_defaults``, loaded inside the engine), so vLLM's
own checks apply as they are (``echo`` with ``suffix``, prompt embeddings, truncation, token-id
prompts: ``vllm/renderers/online_renderer.py``) and usage counts the rendered prompt.

A model fills when its manifest entry says ``fim: true`` (its catalog format) or names a format, or,
with ``fim`` unset, when the catalog says it does. Each format's facts carry their source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Order = Literal["psm", "spm"]


@dataclass(frozen=True)
class FimFormat:
    """How a fill prompt is written, and the tokens that end a fill."""

    name: str
    prefix: str
    suffix: str
    middle: str
    #: prefix-suffix-middle (the prefix, then the suffix, then the model writes the middle) or
    #: suffix-prefix-middle (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in
    #: the Middle", arXiv:2207.14255, section 3).
    order: Order
    #: Special tokens that end a fill (stop_token_ids), besides the family's end of text.
    stop_tokens: tuple[str, ...]
    source: str

    @property
    def markers(self) -> tuple[str, str, str]:
        return (self.prefix, self.suffix, self.middle)

    def render(self, prefix: str, suffix: str) -> str:
        if self.order == "spm":
            return f"{self.prefix}{self.suffix}{suffix}{self.middle}{prefix}"
        return f"{self.prefix}{prefix}{self.suffix}{suffix}{self.middle}"


_STARCODER_SOURCE = (
    "StarCoder's tokenizer (<|endoftext|> 0, <fim_prefix> 1, <fim_middle> 2, <fim_suffix> 3, <fim_pad> 4, "
    "<filename> 5; bigcode/starcoderbase tokenizer_config.json additional_special_tokens); the prompt "
    "'<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>' as BigCode answers in bigcode/starcoder "
    "discussion 22 and TabbyML/registry-tabby models.json give it; StarCoder 'was trained using the "
    "Fill-in-the-Middle objective' (its card; arXiv:2305.06161). Stops: the markers, <|endoftext|>, "
    "<filename> (StarCoder's file marker) and <file_sep> (StarCoder2's); each is used only where the "
    "engine's tokenizer has it")

FORMATS: dict[str, FimFormat] = {
    f.name: f
    for f in (
        FimFormat(
            name="starcoder",
            prefix="<fim_prefix>", suffix="<fim_suffix>", middle="<fim_middle>", order="psm",
            stop_tokens=("<|endoftext|>", "<file_sep>", "<filename>", "<fim_prefix>", "<fim_suffix>",
                         "<fim_middle>", "<fim_pad>"),
            source=_STARCODER_SOURCE,
        ),
        FimFormat(
            name="starcoder-spm",
            prefix="<fim_prefix>", suffix="<fim_suffix>", middle="<fim_middle>", order="spm",
            stop_tokens=("<|endoftext|>", "<file_sep>", "<filename>", "<fim_prefix>", "<fim_suffix>",
                         "<fim_middle>", "<fim_pad>"),
            source=_STARCODER_SOURCE + "; suffix first as StarCoder was trained ('SPMv2': "
            "'<fim_prefix><fim_suffix>{suffix}<fim_middle>{prefix}', nuprl/MultiPL-E starcoder2.py)",
        ),
    )
}

FormatName = Literal["starcoder", "starcoder-spm"]

# Not offered: Code Llama's infilling format ('<PRE> {prefix} <SUF>{suffix} <MID>', ending with
# <EOT>; meta-llama/codellama llama/generation.py infilling_prompt_tokens), which only its 7B and 13B
# models were trained for (meta-llama/codellama README). Its markers are sentencepiece pieces
# (``▁<PRE>``, ``▁<SUF>``, ``▁<MID>``, ``▁<EOT>``, ids 32007-32010 in the 7B/13B tokenizers), not the
# text above, so the prompt must be built from token ids; no model of this fleet has them
# (CodeFuse-CodeLlama-34B's vocabulary ends at 31999) and none was at hand to test it against.


def get_format(name: str) -> FimFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown fill-in-the-middle format {name!r}; known: {', '.join(FORMATS)}") from None
