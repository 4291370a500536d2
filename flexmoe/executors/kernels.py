"""Which expert kernel can run: grouped_mm's dtype and alignment limits, the CPU per-expert rule."""

from __future__ import annotations

import torch
from torch import nn

from flexmoe.experts import GROUPED_DTYPES, PER_EXPERT_MIN_ROWS


def grouped_unsupported_reason(experts: nn.Module, dims: tuple[int, int], dtype: torch.dtype) -> str | None:
    """Why ``grouped_mm`` cannot run ``experts`` with (model_dim, hidden_dim) ``dims`` in
    ``dtype``, or None when it can (float32/bfloat16/float16, 16-byte aligned rows)."""
    if not hasattr(experts, "forward_grouped"):
        return "the experts have no forward_grouped()"
    if dtype not in GROUPED_DTYPES:
        return f"grouped_mm supports {GROUPED_DTYPES}, got {dtype}"
    itemsize = dtype.itemsize
    if any(d * itemsize % 16 for d in dims):
        return f"grouped_mm needs model_dim and hidden_dim {dims} times {itemsize} bytes to be multiples of 16"
    return None


def prefers_per_expert(device: torch.device, rows: int, busy_experts: int) -> bool:
    """On CPU, one plain GEMM pair per expert beats ``grouped_mm`` from ``PER_EXPERT_MIN_ROWS``
    rows per busy expert (benchmarks/layer.py measures both)."""
    return device.type == "cpu" and rows >= PER_EXPERT_MIN_ROWS * max(busy_experts, 1)
