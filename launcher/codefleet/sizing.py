"""The model-shape arithmetic of the capacity planner (its memory model is at the top of planner.py):
parameters, weight, KV-cache, activation and sampler bytes, the per-GPU budget, the TP sizes a
shape allows and the host CPUs a replica reserves. Pure functions, no plan or manifest."""

from __future__ import annotations

import math

from codefleet.gpus import Gpu
from codefleet.quant import Quant
from codefleet.shapes import ModelShape

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: vLLM's --kv-cache-dtype values the planner sizes ("auto": the model's dtype).
KV_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1}
RESERVE_FIXED_GIB = 1.0
#: vLLM's KV-cache block (tokens); capacity is a whole number of blocks.
BLOCK_TOKENS = 16
#: Logits are float32 in vLLM's sampler.
LOGIT_BYTES = 4


def parameter_count(s: ModelShape) -> int:
    """Every parameter, biases and norms included (all experts of an MoE)."""
    h, kv_dim, q_dim = s.hidden_size, s.num_kv_heads * s.head_dim, s.num_heads * s.head_dim
    attn = h * q_dim + 2 * h * kv_dim + q_dim * h
    if s.qkv_bias:
        attn += q_dim + 2 * kv_dim
    if s.out_bias:
        attn += h
    n_mats = 3 if s.mlp_kind == "gated" else 2
    mlp = n_mats * h * s.intermediate_size
    if s.mlp_bias:
        mlp += (2 * s.intermediate_size if s.mlp_kind == "gated" else s.intermediate_size) + h
    if s.is_moe:
        mlp = s.num_experts * mlp + h * s.num_experts  # experts + router
    norm = 2 * h if s.norm_kind == "layer" else h
    layer = attn + mlp + 2 * norm
    embed = s.vocab_size * h
    total = s.num_layers * layer + embed + norm
    if not s.tie_word_embeddings:
        total += embed
    if s.learned_positions:
        total += s.max_position * h
    return total


def active_parameter_count(s: ModelShape) -> int:
    """Parameters read per token: for an MoE only the routed experts count."""
    total = parameter_count(s)
    if not s.is_moe:
        return total
    expert = 3 * s.hidden_size * s.intermediate_size
    return total - s.num_layers * (s.num_experts - s.experts_per_token) * expert


def linear_parameter_count(s: ModelShape) -> int:
    """The weights of the attention and MLP matrices (every expert): what a quantized checkpoint
    stores in fewer bits. Embeddings, the LM head, norms, biases and MoE routers are not."""
    h, kv_dim, q_dim = s.hidden_size, s.num_kv_heads * s.head_dim, s.num_heads * s.head_dim
    mlp = (3 if s.mlp_kind == "gated" else 2) * h * s.intermediate_size
    return s.num_layers * (h * q_dim + 2 * h * kv_dim + q_dim * h + mlp * max(1, s.num_experts))


def weight_bytes(s: ModelShape, dtype_bytes: int, quant: Quant | None = None) -> int:
    params = parameter_count(s)
    if quant is None:
        return params * dtype_bytes
    linear = linear_parameter_count(s)
    return math.ceil(linear * quant.linear_bytes_per_param()) + (params - linear) * dtype_bytes


def kv_heads_per_rank(s: ModelShape, tp: int) -> int:
    return max(1, s.num_kv_heads // tp)


def kv_bytes_per_token(s: ModelShape, dtype_bytes: int, tp: int = 1) -> int:
    """KV-cache bytes per token on each GPU of a replica."""
    return 2 * s.num_layers * kv_heads_per_rank(s, tp) * s.head_dim * dtype_bytes


def activation_bytes(s: ModelShape, dtype_bytes: int, tp: int, batched_tokens: int) -> int:
    """One scheduler step's activations at their peak in vLLM's profiling run."""
    routed = max(1, s.experts_per_token) if s.is_moe else 1
    per_token = (4 * s.hidden_size + 2 * routed * s.intermediate_size // tp) * dtype_bytes
    return batched_tokens * per_token


def sampler_bytes(s: ModelShape, max_num_seqs: int) -> int:
    """The float32 logits of a full batch (vLLM's profiling run samples ``max_num_seqs`` sequences)."""
    return max_num_seqs * s.vocab_size * LOGIT_BYTES


def reserve_bytes(s: ModelShape, dtype_bytes: int, tp: int, batched_tokens: int = 8192,
                  max_num_seqs: int = 256) -> int:
    return (int(RESERVE_FIXED_GIB * GiB) + activation_bytes(s, dtype_bytes, tp, batched_tokens)
            + sampler_bytes(s, max_num_seqs))


def budget_bytes(gpu: Gpu, utilization: float) -> int:
    """What vLLM may use on one GPU: ceil(CUDA's total x gpu_memory_utilization) (vLLM's request_memory)."""
    return math.ceil(gpu.usable_gib * GiB * utilization)


def valid_tp(s: ModelShape, group_size: int | None = None) -> list[int]:
    return s.valid_tensor_parallel_sizes(group_size)



#: Host CPUs a replica reserves (Ray's bundle, the chart's CPU request): one core for each vLLM
#: process that keeps one busy: the API server (HTTP, tokenizer, detokenizer), the engine core's
#: scheduler loop, and one worker per GPU (each prepares its rank's inputs and spins on the
#: broadcast queue). Fewer and the scheduler and workers share a core, which shows up as time
#: to first token and between tokens; a reservation, not a cap (the chart sets no CPU limit).
HOST_CPUS_BESIDES_WORKERS = 2


def host_cpus(accelerator: str, tp: int) -> int:
    """CPUs one replica reserves on its host; on the CPU (gpu: cpu) each rank computes on its own."""
    return tp if accelerator == "cpu" else HOST_CPUS_BESIDES_WORKERS + tp

