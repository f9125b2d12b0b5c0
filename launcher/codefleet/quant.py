"""Quantized weights, as the planner counts them.

A quantized checkpoint (AWQ, GPTQ, FP8, ...) stores the linear layers' weights in fewer bits;
embeddings, the LM head, norms and MoE routers stay in the model's dtype. The method comes from
the manifest's ``engine_args.quantization`` or from the checkpoint's ``config.json``
(``quantization_config``), as vLLM reads it.

Bytes per linear parameter:
* integer, group-wise (AWQ, GPTQ and their Marlin kernels): bits/8, plus per group of
  ``group_size`` input rows an fp16 scale and a packed ``bits``-bit zero point;
* FP8 (per tensor, channel or block) and other 8-bit schemes: 1 (the scales are negligible);
* FP4 (NVFP4, MXFP4): 0.5 plus a one-byte scale per group of 16 / 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GROUPWISE_INT = frozenset({"awq", "awq_marlin", "auto_awq", "gptq", "gptq_marlin", "auto_gptq", "moe_wna16"})
EIGHT_BIT = frozenset({"fp8", "fbgemm_fp8", "fp8_per_tensor", "fp8_per_channel", "fp8_per_block", "modelopt",
                       "modelopt_mxfp8", "mxfp8", "int8_per_channel_weight_only", "experts_int8", "deepseek_v4_fp8"})
FOUR_BIT_FP = {"modelopt_fp4": 16, "nvfp4_per_token": 16, "mxfp4": 32, "gpt_oss_mxfp4": 32}


@dataclass(frozen=True)
class Quant:
    method: str
    bits: int
    group_size: int | None
    #: Where the method was found: ``engine_args.quantization`` or ``config.json``.
    source: str

    def linear_bytes_per_param(self) -> float:
        if self.method in FOUR_BIT_FP:
            return 0.5 + 1 / FOUR_BIT_FP[self.method]
        if self.group_size:
            return self.bits / 8 + (2 + self.bits / 8) / self.group_size
        return self.bits / 8

    def describe(self) -> str:
        group = f", group {self.group_size}" if self.group_size else ""
        return f"{self.method} ({self.bits}-bit{group}; {self.linear_bytes_per_param():.3f} bytes per linear weight)"


def _bits_group(method: str, qc: dict[str, Any]) -> tuple[int, int | None]:
    if method in GROUPWISE_INT:
        bits = int(qc.get("bits") or qc.get("w_bit") or 4)
        group = qc.get("group_size", qc.get("q_group_size", 128))
        return bits, (int(group) if group and int(group) > 0 else None)
    if method == "compressed-tensors":
        weights = next((g.get("weights") or {} for g in (qc.get("config_groups") or {}).values()), {})
        bits = int(weights.get("num_bits") or 8)
        group = weights.get("group_size")
        return bits, (int(group) if group else None)
    if method in FOUR_BIT_FP:
        return 4, FOUR_BIT_FP[method]
    return 8, None


def detect(engine_quantization: str | None, config: dict[str, Any] | None) -> tuple[Quant | None, str | None]:
    """(the quantization the plan counts, a warning when it cannot count one it was told of)."""
    qc = dict((config or {}).get("quantization_config") or {})
    method = engine_quantization or qc.get("quant_method")
    if not method:
        return None, None
    method = str(method).lower()
    source = "engine_args.quantization" if engine_quantization else "config.json quantization_config"
    if method not in GROUPWISE_INT | EIGHT_BIT | set(FOUR_BIT_FP) | {"compressed-tensors"}:
        return None, (f"quantization {method!r} ({source}) is not one the planner sizes; its weights are "
                      f"planned at the model's dtype, which overstates them")
    bits, group = _bits_group(method, qc)
    return Quant(method, bits, group, source), None
