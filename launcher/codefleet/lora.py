"""LoRA adapters per model: the manifest's ``adapters:``, ``max_loras`` and ``max_lora_rank``,
checked the way vLLM 0.32 checks them, the memory vLLM reserves for them, and the address trick
that lets vllm-router route an adapter's name to its base model's replicas.

vLLM's rules (the installed vllm/config/lora.py, engine/arg_utils.py and lora/peft_helper.py, 0.32):

- ``--max-lora-rank`` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (``MaxLoRARanks``; argparse
  refuses any other); an adapter whose ``r`` is above it fails to load ("LoRA rank R is greater
  than max_lora_rank M"). ``--max-loras`` >= 1 is the adapters active in one batch; ``max_cpu_loras``
  (the engine's cache of loaded adapters) defaults to it, and an adapter evicted from that cache
  is read again from its path on its next request (lora/worker_manager.py).
- An adapter is a PEFT folder: ``adapter_config.json`` with ``r``, ``lora_alpha`` and
  ``target_modules``, and ``adapter_model.safetensors`` (or ``.bin``) with
  ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (PEFT's checkpoint format,
  huggingface.co/docs/peft/main/en/developer_guides/checkpoint; vllm/lora/lora_model.py).
  DoRA, ``bias`` other than "none" and ``modules_to_save`` beyond a classifier are refused.
- Architectures: StableLM has no LoRA in vLLM 0.32 (``StablelmForCausalLM`` lacks ``SupportsLoRA``:
  "does not support LoRA yet"); GraniteMoe's LoRA needs the Triton fused-MoE kernel, which the CPU
  platform does not have (vllm/model_executor/layers/fused_moe/oracle/unquantized.py picks Triton
  when LoRA is on; vllm/lora/punica_wrapper/punica_cpu.py has no MoE LoRA ops).
- Each wrapped layer pre-allocates ``max_loras`` slots at ``max_lora_rank`` (vllm/lora/layers/
  base_linear.py, column_parallel_linear.py, vocab_parallel_embedding.py, logits_processor.py):
  A (r, in) and B (out, r) per slice, for every linear layer and for embed_tokens and lm_head.
  On a GPU that memory is taken before the KV cache is sized; on the CPU it comes on top of
  VLLM_CPU_KVCACHE_SPACE (nothing subtracts it). ``lora_slot_bytes`` is that sum.

Routing by name: vllm-router 0.1.17 keeps one model id per worker URL (``POST /workers`` again
with the same URL and another model id replaces the first; measured). An adapter's replicas are
registered under an alias of each engine's URL that names the same address: the last octet of the
IPv4 address written with leading zeros (``127.0.0.01`` is ``127.0.0.1`` to the WHATWG URL parser
vllm-router's HTTP client uses, and to inet_aton). Tried and rejected: a user name in the URL
(``http://a@127.0.0.1:p``) makes the router's client send ``Authorization: Basic``, replacing the
gateway's bearer key; a trailing slash doubles the path's slash (404). The alias is registered
after the adapter loaded on that engine and removed before it is unloaded, so the router never
sends an adapter's request to an engine that does not have it.
"""

from __future__ import annotations

import ipaddress
import json
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from codefleet.shapes import ModelShape

#: vLLM's ``MaxLoRARanks`` (vllm/config/lora.py).
RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: vLLM flags codefleet decides when a model has adapters (set the model's fields instead).
FLAGS = ("enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "lora_modules")
#: Turns on vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (vllm/envs.py). The engines
#: listen on 127.0.0.1 (local) or inside the cluster; the gateway forwards only the OpenAI paths.
RUNTIME_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
#: Architectures vLLM 0.32 cannot serve with LoRA, and why (see the module docstring).
UNSUPPORTED = {"StableLmForCausalLM": "vLLM 0.32's StableLM has no LoRA support (StablelmForCausalLM lacks "
                                      "SupportsLoRA: 'does not support LoRA yet')"}
CPU_UNSUPPORTED = {"GraniteMoeForCausalLM": "vLLM 0.32 serves a MoE model's LoRA only with the Triton fused-MoE "
                                            "kernel, which the CPU platform does not have"}
#: ``source: demo-lora://SEED``: a deterministic adapter built for the model's own demo checkpoint.
DEMO_SCHEME = "demo-lora://"
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"


class Adapter(BaseModel):
    """One entry of a model's ``adapters:``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128, pattern=ADAPTER_NAME)
    """What clients put in ``model`` to use it (unique in the fleet, never a model's name)."""
    source: str = Field(min_length=1)
    """A local PEFT folder (relative to the manifest), a Hugging Face id, or ``demo-lora://SEED``
    (an adapter built for the model's demo checkpoint, for tests and the demo)."""
    revision: str | None = None
    """Of a Hugging Face source."""


@dataclass(frozen=True)
class AdapterPlan:
    name: str
    #: What vLLM loads: an absolute folder, or (on the chart) the folder the preload fills.
    path: str
    source: str
    revision: str | None
    rank: int | None


@dataclass(frozen=True)
class LoraPlan:
    max_loras: int
    max_lora_rank: int
    adapters: tuple[AdapterPlan, ...]

    def flags(self) -> dict[str, Any]:
        """vLLM's LoRA flags (the adapters themselves are loaded at run time, or by the chart)."""
        return {"enable_lora": True, "max_loras": self.max_loras, "max_lora_rank": self.max_lora_rank}

    def engine_settings(self) -> tuple[int, int]:
        """What a replica's engine was started with (part of its generation; the adapters are not)."""
        return self.max_loras, self.max_lora_rank


def smallest_rank(r: int) -> int | None:
    """vLLM's smallest allowed ``max_lora_rank`` that holds an adapter of rank ``r``."""
    return next((x for x in RANKS if x >= r), None)


def read_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT folder; ValueError with what is wrong."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no adapter_config.json (a LoRA adapter is a PEFT folder: "
                         f"adapter_config.json and adapter_model.safetensors)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (vLLM requires r, lora_alpha and target_modules)")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r}; vLLM serves LORA adapters only")
    if config.get("use_dora"):
        raise ValueError(f"{path}: use_dora is true; vLLM 0.32 does not serve DoRA adapters")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias {config.get('bias')!r}; vLLM serves adapters with bias 'none' only")
    if not isinstance(config["r"], int) or config["r"] < 1:
        raise ValueError(f"{path}: r {config['r']!r} is not a positive integer")
    if not any((folder / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ValueError(f"{folder} has no adapter_model.safetensors (or .bin)")
    return config


def base_matches(config: dict[str, Any], names: set[str]) -> bool:
    """The adapter was made for one of ``names`` (the model's source, Hugging Face id or folder);
    an adapter that names no base is taken as it is."""
    base = config.get("base_model_name_or_path")
    if not base:
        return True
    base = str(base).rstrip("/")
    return base in names or Path(base).name in {Path(n).name for n in names}


def architecture_problem(architecture: str, on_cpu: bool) -> str | None:
    if architecture in UNSUPPORTED:
        return UNSUPPORTED[architecture]
    if on_cpu and architecture in CPU_UNSUPPORTED:
        return CPU_UNSUPPORTED[architecture]
    return None


def lora_slot_bytes(s: ModelShape, rank: int, dtype_bytes: int, tp: int = 1) -> int:
    """Bytes vLLM pre-allocates for one LoRA slot at ``rank`` on one GPU (rank), from the shapes of
    the wrapped layers: per slice A (r, in) + B (out, r); column-parallel outputs and row-parallel
    inputs are split over TP. Llama's packing: qkv 3 slices, gate_up 2 (llama.py
    packed_modules_mapping); a MoE layer's experts each carry their own w13 and w2."""
    h, inter = s.hidden_size, s.intermediate_size
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    mlp_slices = 2 if s.mlp_kind == "gated" else 1
    qkv = 3 * h + (q + 2 * kv) // tp
    out = q // tp + h
    mlp = mlp_slices * h + mlp_slices * inter // tp + inter // tp + h
    per_layer = qkv + out + (mlp * max(1, s.num_experts))
    embeddings = 2 * (s.vocab_size + h)  # embed_tokens: A (vocab, r), B (h, r); lm_head: A (r, h), B (vocab, r)
    return rank * dtype_bytes * (s.num_layers * per_layer + embeddings)


def alias_url(url: str, n: int) -> str:
    """The ``n``-th alias (n >= 1) of an engine's URL: the same address, spelled so vllm-router
    keeps it as another worker (its last IPv4 octet with ``n`` leading zeros, read as octal)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"adapter routing needs an engine address that is an IPv4 literal, not {host!r}") from None
    if not isinstance(ip, ipaddress.IPv4Address):
        raise ValueError(f"adapter routing needs an IPv4 engine address, not {host!r}")
    octets = str(ip).split(".")
    octets[-1] = "0" * n + format(int(octets[-1]), "o")
    netloc = ".".join(octets) + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def demo_seed(source: str) -> int | None:
    """SEED of ``demo-lora://SEED``; None for any other source."""
    if not source.startswith(DEMO_SCHEME):
        return None
    rest = source[len(DEMO_SCHEME):]
    if not rest.isdigit():
        raise ValueError(f"{source!r}: {DEMO_SCHEME} takes a seed, a whole number (demo-lora://1)")
    return int(rest)


def is_hub_id(source: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is not None


Problem = tuple[tuple[str | int, ...], str]


def resolve_adapters(adapters: list[Adapter], max_loras: int | None, max_lora_rank: int | None, *,
                     manifest_dir: Path, base_names: set[str], architecture: str, on_cpu: bool,
                     demo_dir: Path | None, demo_root: Path) -> tuple[LoraPlan | None, list[Problem]]:
    """The model's LoRA plan (None: LoRA off), and the problems found, each at its field's path
    relative to the model (``("adapters", 0, "source")``)."""
    if not adapters and max_loras is None and max_lora_rank is None:
        return None, []
    problems: list[Problem] = []
    where = ("adapters",) if adapters else ("max_loras",) if max_loras is not None else ("max_lora_rank",)
    if (why := architecture_problem(architecture, on_cpu)) is not None:
        return None, [(where, f"LoRA adapters on {architecture}: {why}")]
    planned: list[AdapterPlan] = []
    for j, a in enumerate(adapters):
        at: tuple[str | int, ...] = ("adapters", j)
        rank: int | None = None
        try:
            seed = demo_seed(a.source)
        except ValueError as exc:
            problems.append(((*at, "source"), str(exc)))
            continue
        if seed is not None:
            if demo_dir is None:
                problems.append(((*at, "source"), f"{a.source}: demo adapters are built for demo:// models only"))
                continue
            from codefleet import lora_build

            rank = lora_build.RANK
            path = str(lora_build.adapter_dir(demo_root, demo_dir, seed))
        elif a.source.startswith((".", "/", "~")) or not is_hub_id(a.source) or (manifest_dir / a.source).exists():
            folder = Path(a.source).expanduser()
            folder = folder if folder.is_absolute() else (manifest_dir / folder).resolve()
            try:
                config = read_config(folder)
            except ValueError as exc:
                problems.append(((*at, "source"), str(exc)))
                continue
            if not base_matches(config, base_names):
                problems.append(((*at, "source"), f"{folder}/adapter_config.json was made for "
                                 f"{config.get('base_model_name_or_path')!r}, not for this model "
                                 f"({', '.join(sorted(base_names))})"))
                continue
            rank, path = int(config["r"]), str(folder)
        else:
            path = ""  # a Hugging Face id: fetched into the weight cache before it is loaded
        if a.revision is not None and seed is None and path and not is_hub_id(a.source):
            problems.append(((*at, "revision"), "revision is for a Hugging Face source, not a local folder"))
        planned.append(AdapterPlan(a.name, path, a.source, a.revision, rank))
    ranks = [p.rank for p in planned if p.rank is not None]
    rank_limit = max_lora_rank
    if rank_limit is None:
        if len(ranks) < len(planned):
            unknown = next(p.name for p in planned if p.rank is None)
            problems.append((where, f"set max_lora_rank: the rank of {unknown!r} (a Hugging Face adapter) is known "
                             f"only once it is downloaded; one of {', '.join(map(str, RANKS))}"))
        rank_limit = smallest_rank(max(ranks, default=16))
        if rank_limit is None:
            problems.append((where, f"an adapter's rank {max(ranks)} is above vLLM's largest max_lora_rank {RANKS[-1]}"))
            rank_limit = RANKS[-1]
    for j, p in enumerate(planned):
        if p.rank is not None and p.rank > rank_limit:
            problems.append((("adapters", j, "source"), f"adapter {p.name!r} has rank {p.rank}, above max_lora_rank "
                             f"{rank_limit} (vLLM would refuse to load it); raise max_lora_rank to "
                             f"{smallest_rank(p.rank)}"))
    slots = max_loras if max_loras is not None else max(1, len(planned))
    return LoraPlan(slots, rank_limit, tuple(planned)), problems
