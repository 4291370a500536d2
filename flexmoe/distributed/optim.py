"""Optimizer parameter groups for models whose experts are DTensors and the rest plain tensors.

PyTorch's multi-tensor optimizer kernels (``foreach``, the default on CUDA, and ``fused``) run
one operation over every parameter of a group, which fails on a group mixing DTensors and plain
tensors ("got mixed torch.Tensor and DTensor"). One group per device mesh avoids that, as
transformers' Trainer does for its own optimizer::

    optimizer = torch.optim.AdamW(parameter_groups(model), lr=1e-3)
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.tensor import DTensor


def parameter_groups(model: nn.Module, **options: Any) -> list[dict[str, Any]]:
    """``model``'s trainable parameters as optimizer parameter groups, one per device mesh (plain
    tensors first), each ``{"params": [...], **options}``; in module order within a group."""
    groups: dict[object, list[nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            mesh = param.device_mesh if isinstance(param, DTensor) else None
            groups.setdefault(mesh, []).append(param)
    ordered = sorted(groups.items(), key=lambda item: item[0] is not None)
    return [{"params": params, **options} for _, params in ordered]
