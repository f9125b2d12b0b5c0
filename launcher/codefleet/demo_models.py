"""The demo models, built locally: tiny random-weight stand-ins of each seed architecture, and
one trained model.

No model hub is needed: ``demo://FAMILY`` in a manifest names a stand-in: a 2-layer model with a
byte-level BPE tokenizer that carries its family's special tokens; its answers are noise. Builds
are deterministic (fixed seeds, fixed corpus) and cached by a hash of their recipe.
``demo://smollm2-135m-instruct`` names the trained model (``codefleet.trained_model``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from codefleet import trained_model
from codefleet.errors import DemoModelError
from codefleet.families import get_family

SCHEME = "demo://"

_COMMON = {"torch_dtype": "float32", "initializer_range": 0.02}

#: family -> transformers config of its tiny stand-in (same architecture as the seed model).
DEMO_CONFIGS: dict[str, dict[str, Any]] = {
    "granite-code": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "max_position_embeddings": 4096,
        "attention_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": True,
        "rope_theta": 10000000.0,
    },
    "granite": {
        "architectures": ["GraniteMoeForCausalLM"],
        "model_type": "granitemoe",
        "hidden_size": 256,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
    "chatml": {
        "architectures": ["StableLmForCausalLM"],
        "model_type": "stablelm",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "partial_rotary_factor": 0.25,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "alpaca": {
        "architectures": ["GPTBigCodeForCausalLM"],
        "model_type": "gpt_bigcode",
        "n_embd": 256,
        "n_inner": 1024,
        "n_layer": 2,
        "n_head": 4,
        "multi_query": True,
        "n_positions": 4096,
    },
    "codefuse": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "rope_theta": 1000000.0,
    },
}

_TOKENIZER_VOCAB = 1024
#: The model's vocabulary: the tokenizer's, rounded up to a multiple of 64.
DEMO_VOCAB = 1088

_CORPUS = [
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, item):\n        self.items.append(item)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\nreturn sum;\n",
    "import numpy as np\nx = np.arange(10)\nprint(x.mean(), x.std())\n",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n",
    "### Instruction:\nWrite a function that reverses a string.\n\n### Input:\nhello\n\n### Response:",
    "System:\nYou are a helpful coding assistant.\n\nQuestion:\nHow do I sort a list in Python?\n\nAnswer:\n",
    "You are a helpful assistant. Write a simple website in HTML. The quick brown fox jumps over the lazy dog.",
    "user assistant system human bot available_tools tool_response function arguments name\n",
    '{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "string"}}}\n',
]


#: Trained demo models: name -> the catalog id of the model it is.
TRAINED: dict[str, str] = {trained_model.NAME: trained_model.HF_ID}

#: Every demo:// name: the stand-ins (named by family), then the trained models.
NAMES: tuple[str, ...] = (*DEMO_CONFIGS, *TRAINED)


def demo_family(source: str) -> str | None:
    """The demo name a demo:// source names (a family for a stand-in), or None when it is not a demo source."""
    if not source.startswith(SCHEME):
        return None
    return source[len(SCHEME) :]


def is_trained(name: str) -> bool:
    return name in TRAINED


def hf_config(family: str) -> dict[str, Any]:
    if family in TRAINED:
        # What resolve needs before the build (dtype, no quantization); the shape is the catalog's.
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "torch_dtype": trained_model.DTYPE}
    if family not in DEMO_CONFIGS:
        raise DemoModelError(f"no demo model for family {family!r}; known: {', '.join(DEMO_CONFIGS)}")
    fam = get_family(family)
    config = {**_COMMON, **DEMO_CONFIGS[family], "vocab_size": DEMO_VOCAB}
    return config | {"_special_tokens": list(fam.special_tokens)}


def cache_root() -> Path:
    base = os.environ.get("CODEFLEET_HOME") or os.path.join(Path.home(), ".cache", "codefleet")
    return Path(base) / "demo-models"


def _recipe_hash(family: str) -> str:
    fam = get_family(family)
    recipe = {
        "config": hf_config(family),
        "corpus": _CORPUS,
        "vocab": _TOKENIZER_VOCAB,
        "bos": fam.bos_token,
        "eos": fam.eos_token,
        "v": 1,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def model_dir(family: str) -> Path:
    if family in TRAINED:
        return trained_model.model_dir(cache_root())
    return cache_root() / f"{family}-{_recipe_hash(family)}"


def ensure(family: str) -> Path:
    """Build the demo checkpoint of a family (or a trained demo model) unless it is cached; return its directory."""
    if family in TRAINED:
        return trained_model.ensure(cache_root(), say=lambda s: print(s, flush=True))
    target = model_dir(family)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
    try:
        _build(family, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            if not (target / "config.json").exists():
                raise
    except Exception as exc:
        raise DemoModelError(f"building the demo model for {family!r} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_tokenizer(family: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = get_family(family)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB,
        special_tokens=list(fam.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=fam.bos_token,
        eos_token=fam.eos_token,
        unk_token="<unk>" if "<unk>" in fam.special_tokens else None,
        additional_special_tokens=[
            t for t in fam.special_tokens if t not in (fam.bos_token, fam.eos_token, "<unk>")
        ],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def _build(family: str, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tokenizer = _build_tokenizer(family)
    if len(tokenizer) > DEMO_VOCAB:
        raise DemoModelError(f"tokenizer has {len(tokenizer)} tokens, more than {DEMO_VOCAB}")
    raw = hf_config(family)
    raw.pop("_special_tokens")
    model_type = raw.pop("model_type")
    eos_id = tokenizer.convert_tokens_to_ids(get_family(family).eos_token)
    bos = get_family(family).bos_token
    bos_id = tokenizer.convert_tokens_to_ids(bos) if bos else eos_id
    config = AutoConfig.for_model(model_type, **raw, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(out)
