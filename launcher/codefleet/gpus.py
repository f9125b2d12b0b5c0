"""Accelerators the planner knows. Memory is what the driver reports (nvidia-smi), in GiB."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    #: HBM bandwidth, bytes per second.
    bandwidth: float
    #: Dense BF16/FP16 tensor-core peak, FLOP per second.
    flops_bf16: float
    source: str


GPUS: dict[str, Gpu] = {
    g.name: g
    for g in (
        Gpu("a100-40gb", 40.0, 1555e9, 312e12, "NVIDIA A100 datasheet (SXM4 40GB: 1,555 GB/s, 312 TFLOPS BF16)"),
        Gpu("a100-80gb", 80.0, 2039e9, 312e12, "NVIDIA A100 datasheet (SXM4 80GB: 2,039 GB/s, 312 TFLOPS BF16)"),
        Gpu("h100-80gb", 79.6, 3350e9, 989e12, "NVIDIA H100 datasheet (SXM5 80GB: 3.35 TB/s, 989 TFLOPS BF16 dense)"),
        Gpu("h200-141gb", 140.4, 4800e9, 989e12, "NVIDIA H200 datasheet (SXM 141GB: 4.8 TB/s, 989 TFLOPS BF16 dense)"),
    )
}
