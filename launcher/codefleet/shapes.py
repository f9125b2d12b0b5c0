"""Model shapes: what the planner needs to know about an architecture, read from config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Architectures codefleet can count parameters for. Others are refused with this list.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "GraniteForCausalLM",
    "GraniteMoeForCausalLM",
    "StableLmForCausalLM",
    "GPTBigCodeForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
)


@dataclass(frozen=True)
class ModelShape:
    """The published shape of a decoder-only transformer."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position: int
    tie_word_embeddings: bool
    num_experts: int = 0
    experts_per_token: int = 0
    #: Biases on the q, k and v projections.
    qkv_bias: bool = False
    #: Bias on the attention output projection.
    out_bias: bool = False
    mlp_bias: bool = False
    #: "gated": three projections (gate, up, down); "plain": two (fc, proj) as in GPT-2.
    mlp_kind: str = "gated"
    #: "rms": one weight vector; "layer": weight and bias.
    norm_kind: str = "rms"
    learned_positions: bool = False

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def tp_problems(self, tp: int, group_size: int | None = None) -> list[str]:
        """Why vLLM would refuse this model at tensor parallel size ``tp`` (empty: it starts).

        The checks vLLM makes while building the model: attention heads divide by TP
        (ModelConfig.verify_with_parallel_config); KV heads are sharded when TP divides them and
        replicated when they divide TP (QKVParallelLinear); the MLP width (each expert's, for an
        MoE) divides by TP (ColumnParallelLinear's ``divide``); with a group-wise quantized
        checkpoint each rank's share of the MLP width is a whole number of groups (AWQ/GPTQ:
        "The input size is not aligned with the quantized weight shape")."""
        out = []
        if self.num_heads % tp:
            out.append(f"the {self.num_heads} attention heads do not divide by {tp}")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            out.append(f"the {self.num_kv_heads} KV heads neither divide by {tp} nor divide it")
        width = "expert MLP width" if self.is_moe else "MLP width"
        if self.intermediate_size % tp:
            out.append(f"the {width} {self.intermediate_size} does not divide by {tp}")
        elif group_size and (self.intermediate_size // tp) % group_size:
            out.append(f"each rank's {width} {self.intermediate_size // tp} is not a whole number of "
                       f"quantization groups of {group_size}")
        return out

    def valid_tensor_parallel_sizes(self, group_size: int | None = None, upto: int = 64) -> list[int]:
        """TP sizes vLLM accepts for this shape (``tp_problems`` finds none), up to ``upto``."""
        return [n for n in range(1, min(upto, self.num_heads) + 1) if not self.tp_problems(n, group_size)]

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelShape:
        """Read a Hugging Face config.json. Raises ValueError naming what is missing."""
        archs = config.get("architectures") or []
        arch = archs[0] if archs else config.get("model_type", "?")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {arch!r} is not known to the planner; "
                f"known: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if arch == "GPTBigCodeForCausalLM":
            hidden = int(config["n_embd"])
            heads = int(config["n_head"])
            return cls(
                architecture=arch,
                hidden_size=hidden,
                intermediate_size=int(config.get("n_inner") or 4 * hidden),
                num_layers=int(config["n_layer"]),
                num_heads=heads,
                num_kv_heads=1 if config.get("multi_query", True) else heads,
                head_dim=hidden // heads,
                vocab_size=int(config["vocab_size"]),
                max_position=int(config["n_positions"]),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
                qkv_bias=True,
                out_bias=True,
                mlp_bias=True,
                mlp_kind="plain",
                norm_kind="layer",
                learned_positions=True,
            )
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        is_stablelm = arch == "StableLmForCausalLM"
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=int(config["vocab_size"]),
            max_position=int(config["max_position_embeddings"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            num_experts=int(config.get("num_local_experts") or 0),
            experts_per_token=int(config.get("num_experts_per_tok") or 0),
            qkv_bias=bool(config.get("attention_bias") or config.get("use_qkv_bias")),
            out_bias=bool(config.get("attention_bias")),
            mlp_bias=bool(config.get("mlp_bias", False)),
            norm_kind="layer" if is_stablelm else "rms",
        )

    @classmethod
    def from_model_dir(cls, path: Path) -> ModelShape:
        return cls.from_hf_config(json.loads((path / "config.json").read_text()))
