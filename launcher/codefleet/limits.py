"""The engine limits that change a replica's memory (``max_num_seqs``, ``max_num_batched_tokens``,
``kv_cache_dtype``, ``cpu_offload_gb``): the manifest's ``engine_args`` or vLLM's defaults for the GPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from codefleet.errors import PlanError
from codefleet.gpus import Gpu
from codefleet.resolve import ResolvedModel
from codefleet.sizing import DTYPE_BYTES, KV_DTYPE_BYTES, GiB


def engine_arg(args: dict[str, Any], name: str) -> Any:
    """An ``engine_args`` value, however the manifest spelt the key (``max-num-seqs``, ``--max_num_seqs``)."""
    for key, value in args.items():
        if key.lstrip("-").replace("-", "_") == name:
            return value
    return None


@dataclass(frozen=True)
class Limits:
    """The engine limits that change memory, each the manifest's or vLLM's default for the GPU."""

    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_dtype: str
    kv_dtype_bytes: int
    cpu_offload_bytes: int
    #: Where each came from (for ``plan --explain``).
    sources: dict[str, str] = field(default_factory=dict)


def engine_limits(m: ResolvedModel, gpu: Gpu) -> Limits:
    args = m.spec.engine_args
    default_tokens, default_seqs = gpu.batch_defaults()
    vllm = f"vLLM's default on {gpu.name}"
    seqs, tokens = engine_arg(args, "max_num_seqs"), engine_arg(args, "max_num_batched_tokens")
    sources = {"max_num_seqs": "engine_args" if seqs else vllm,
               "max_num_batched_tokens": "engine_args" if tokens else vllm}
    if tokens is None:
        tokens = default_tokens
        if engine_arg(args, "enable_chunked_prefill") is False:
            tokens = max(m.max_model_len, default_tokens)  # vLLM: a whole prompt in one step
            sources["max_num_batched_tokens"] += " (no chunked prefill: at least max_model_len)"
    kv_dtype = str(engine_arg(args, "kv_cache_dtype") or "auto")
    if kv_dtype == "auto":
        kv_bytes = dtype_bytes(m)
    elif kv_dtype in KV_DTYPE_BYTES:
        kv_bytes = KV_DTYPE_BYTES[kv_dtype]
    else:
        raise PlanError(f"{m.spec.name}: engine_args.kv_cache_dtype {kv_dtype!r} is not one the planner sizes; "
                        f"use auto or one of {', '.join(KV_DTYPE_BYTES)}")
    sources["kv_cache_dtype"] = f"{kv_dtype} from engine_args" if kv_dtype != "auto" else f"auto: the model's {m.dtype}"
    offload = float(engine_arg(args, "cpu_offload_gb") or 0)
    return Limits(int(seqs or default_seqs), int(tokens), kv_dtype, kv_bytes, int(offload * GiB), sources)


def dtype_bytes(m: ResolvedModel) -> int:
    return DTYPE_BYTES.get(m.dtype, 2)
