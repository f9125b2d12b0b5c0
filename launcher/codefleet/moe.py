"""Tuned fused-MoE kernel configs: does vLLM have one for this model on this GPU?

vLLM's fused MoE kernel (Triton) picks its tile sizes from a JSON file named
``E={experts},N={expert width per rank},device_name={GPU}[,dtype=...].json``
(vllm/model_executor/layers/fused_moe/fused_moe.py ``get_config_file_name``; N is the second
weight's last dimension, the expert's intermediate size / TP), looked up first in
``VLLM_TUNED_CONFIG_FOLDER`` and then among the configs vLLM ships. Without one it logs "Using
default MoE config. Performance might be sub-optimal!" and runs markedly slower (vLLM issues
#17619, #17768). The planner says so before launch, with the command that tunes one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: vLLM's own tuning script, in its source tree (not in the wheel) at the pinned version.
TUNE_SCRIPT = "benchmarks/kernels/benchmark_moe.py"
VLLM_SOURCE = "https://github.com/vllm-project/vllm/tree/v0.32.0"


def config_file_name(experts: int, width_per_rank: int, device: str, dtype: str | None = None) -> str:
    return f"E={experts},N={width_per_rank},device_name={device}" + (f",dtype={dtype}" if dtype else "") + ".json"


def shipped_configs_dir() -> Path | None:
    """vLLM's shipped configs folder, found without importing vLLM (None: vLLM is not installed)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model_executor" / "layers" / "fused_moe" / "configs"
    return folder if folder.is_dir() else None


def config_dtype(dtype: str, quantization: str | None) -> str | None | bool:
    """The ``dtype=`` part vLLM's Triton MoE path uses; False when it takes another kernel."""
    if quantization is None:
        return None  # bf16 / fp16: no dtype selector
    if quantization.startswith("fp8"):
        return "fp8_w8a8"
    if quantization == "experts_int8":
        return "int8_w8a16"
    return False  # AWQ/GPTQ/FP4 MoE run other kernels (Marlin, moe_wna16, CUTLASS)


def tune_command(model_ref: str, tp: int, fp8: bool) -> str:
    return (f"python {TUNE_SCRIPT} --model {model_ref} --tp-size {tp} --dtype {'fp8_w8a8' if fp8 else 'auto'} --tune "
            f"(vLLM's source at {VLLM_SOURCE}, on that GPU; it writes the JSON into the current folder)")
