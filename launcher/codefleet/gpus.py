"""Accelerators the planner knows, as vLLM sees them.

``memory_gib`` is the marketed size. vLLM budgets ``gpu_memory_utilization`` x the total that
CUDA reports (``torch.cuda.mem_get_info()[1]``; vllm/v1/worker/utils.py ``request_memory``),
which is smaller: ``usable_gib``, read from vLLM's own start-up line "the current vLLM instance
can use total_gpu_memory (X GiB) x gpu_memory_utilization" in published logs (ECC and the driver
take the rest; the spread between drivers is about 0.2 GiB, noted per GPU).

``device_name`` is what ``torch.cuda.get_device_name()`` answers; vLLM uses it for its batch
defaults (an "a100" in the name keeps the small ones) and, with spaces as underscores, to find a
tuned fused-MoE kernel config (``E=..,N=..,device_name=...json``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    #: What CUDA reports as total memory, GiB: the base of vLLM's gpu_memory_utilization.
    usable_gib: float
    #: HBM bandwidth, bytes per second.
    bandwidth: float
    #: Dense BF16/FP16 tensor-core peak, FLOP per second.
    flops_bf16: float
    device_name: str
    source: str
    #: Where usable_gib comes from.
    usable_source: str

    @property
    def moe_device_name(self) -> str:
        """The device part of vLLM's fused-MoE config file names (fused_moe.get_config_file_name)."""
        name = self.device_name.replace(" ", "_")
        return "NVIDIA_H200" if "H200" in name.split("_") else name

    def batch_defaults(self) -> tuple[int, int]:
        """vLLM's OpenAI server defaults when the manifest sets none: (max_num_batched_tokens,
        max_num_seqs). EngineArgs.get_batch_defaults (vllm/engine/arg_utils.py, 0.32.0):
        >= 160 GiB: 16384 / 1024; >= 70 GiB and not an A100: 8192 / 1024; else 2048 / 256."""
        if self.usable_gib >= 160:
            return 16384, 1024
        if self.usable_gib >= 70 and "a100" not in self.device_name.lower():
            return 8192, 1024
        return 2048, 256


_LOGS = "vLLM start-up logs (total_gpu_memory) in published issues and write-ups"

GPUS: dict[str, Gpu] = {
    g.name: g
    for g in (
        Gpu("a100-40gb", 40.0, 39.49, 1555e9, 312e12, "NVIDIA A100-SXM4-40GB",
            "NVIDIA A100 datasheet (SXM4 40GB: 1,555 GB/s, 312 TFLOPS BF16)",
            f"{_LOGS}: 39.39-39.56 GiB on A100-40GB; the middle value"),
        Gpu("a100-80gb", 80.0, 79.15, 2039e9, 312e12, "NVIDIA A100-SXM4-80GB",
            "NVIDIA A100 datasheet (SXM4 80GB: 2,039 GB/s, 312 TFLOPS BF16)",
            f"{_LOGS}: 79.11-79.33 GiB on the 80 GB parts; 79.15 the most seen"),
        Gpu("h100-80gb", 80.0, 79.11, 3350e9, 989e12, "NVIDIA H100 80GB HBM3",
            "NVIDIA H100 datasheet (SXM5 80GB: 3.35 TB/s, 989 TFLOPS BF16 dense)",
            f"{_LOGS}: 79.11 GiB on H100 80GB HBM3"),
        Gpu("h200-141gb", 141.0, 139.81, 4800e9, 989e12, "NVIDIA H200",
            "NVIDIA H200 datasheet (SXM 141GB: 4.8 TB/s, 989 TFLOPS BF16 dense)",
            "143,771 MiB reported by nvidia-smi on H200 SXM (140.4 GiB) less the ~0.6 GiB the driver keeps "
            "(as on the 80 GB parts); not seen in a vLLM log here"),
    )
}


def unknown_gpu_message(name: str, where: str = "") -> str:
    """``unknown GPU type 'h100'; did you mean 'h100-80gb'?`` (with the known ones)."""
    import difflib

    near = difflib.get_close_matches(name, [*GPUS, "cpu"], n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"{where}unknown GPU type {name!r}{hint} (known: {', '.join([*GPUS, 'cpu'])})"
