"""Deterministic LoRA adapters for the demo checkpoints (``source: demo-lora://SEED``), built here
without a hub and without training: seeded random A and B in PEFT's checkpoint format
(huggingface.co/docs/peft/main/en/developer_guides/checkpoint: ``adapter_config.json`` plus
``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` of shape (r, in)
and ``.lora_B.weight`` of shape (out, r)). PEFT's own default initialisation makes B zero, an
identity change; these are not (PEFT's ``init_lora_weights=False`` does the same, "for testing").

The weights are scaled so that the adapter changes greedy answers (a test checks that it does),
and the same seed gives the same bytes. Llama-shaped checkpoints only (the trained demo model and
the granite-code and codefuse stand-ins): vLLM's module names for them are q/k/v/o_proj and
gate/up/down_proj (vllm/model_executor/models/llama.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from codefleet.errors import DemoModelError

RANK = 8
ALPHA = 16
#: Standard deviation of B's entries (A's are 1/sqrt(in)); measured to change greedy answers of the
#: trained model while they stay text (tests/runtime/test_lora.py).
B_STD = 0.1
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECIPE_VERSION = 1


def _modules(config: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(module path, in, out) of every targeted linear layer of a Llama-shaped checkpoint."""
    if config.get("model_type") != "llama":
        raise DemoModelError(f"demo adapters are built for Llama-shaped checkpoints, not {config.get('model_type')!r}")
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    dims = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (heads * head_dim, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    out = []
    for layer in range(config["num_hidden_layers"]):
        for name in TARGETS:
            part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            out.append((f"model.layers.{layer}.{part}.{name}", *dims[name]))
    return out


def build(model_dir: Path, out: Path, seed: int, base_name: str) -> None:
    """Write the adapter of ``seed`` for the checkpoint in ``model_dir`` into ``out``."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, d_in, d_out in _modules(config):
        a = torch.randn(RANK, d_in, generator=g) / d_in ** 0.5
        b = torch.randn(d_out, RANK, generator=g) * B_STD
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(tensors.items())), str(out / "adapter_model.safetensors"))
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA,
                      "target_modules": list(TARGETS), "lora_dropout": 0.0, "bias": "none",
                      "init_lora_weights": False, "use_dora": False, "use_rslora": False,
                      "modules_to_save": None, "base_model_name_or_path": base_name,
                      "codefleet_recipe": {"seed": seed, "b_std": B_STD, "v": RECIPE_VERSION}}
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def adapter_dir(root: Path, model_dir: Path, seed: int) -> Path:
    recipe = json.dumps({"model": model_dir.name, "seed": seed, "rank": RANK, "alpha": ALPHA, "b_std": B_STD,
                         "targets": TARGETS, "v": RECIPE_VERSION}, sort_keys=True)
    return root / f"{model_dir.name}-lora{seed}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"


def ensure(root: Path, model_dir: Path, seed: int, base_name: str) -> Path:
    """The adapter's folder, built unless it is there."""
    target = adapter_dir(root, model_dir, seed)
    if (target / "adapter_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(model_dir, tmp, seed, base_name)
        try:
            tmp.rename(target)
        except OSError:  # built by another process first
            if not (target / "adapter_config.json").is_file():
                raise
    except DemoModelError:
        raise
    except Exception as exc:
        raise DemoModelError(f"building the demo adapter {seed} for {model_dir} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
