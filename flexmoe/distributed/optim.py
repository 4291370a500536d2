"""Optimizer parameter groups for models whose experts are DTensors and the rest plain tensors.

PyTorch's multi-tensor optimizer kernels (``foreach``, the default on CUDA, and ``fused``) run
one operation over every parameter of a group, which fails on a group mixing DTensors and plain
tensors ("got mixed torch.Tensor and DTensor") or DTensors of different meshes. Give them
:func:`parameter_groups`, as transformers' Trainer groups its own optimizer by mesh::

    optimizer = torch.optim.AdamW(parameter_groups(model), lr=1e-3)

The groups are the same at every world size (single process included), so DCP checkpoints of
the optimizer (:mod:`flexmoe.checkpoint`) load across world sizes: DCP matches parameter groups
by position.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from flexmoe.distributed.experts import moe_layers


def parameter_groups(model: nn.Module, **options: Any) -> list[dict[str, Any]]:
    """``model``'s trainable parameters as optimizer parameter groups, each
    ``{"params": [...], **options}``: first every parameter outside the MoE layers' experts, then
    the experts of the layers with the same ``num_experts`` (the layers whose expert DTensors share
    a mesh), by increasing ``num_experts``; module order within a group. Empty groups are left out."""
    experts: dict[int, list[nn.Parameter]] = {}
    for _, layer in moe_layers(model):
        experts.setdefault(layer.config.num_experts, []).extend(layer.experts.parameters())
    expert_ids = {id(param) for params in experts.values() for param in params}
    others = [param for param in model.parameters() if id(param) not in expert_ids]
    groups = [others] + [experts[num_experts] for num_experts in sorted(experts)]
    return [
        {"params": trainable, **options}
        for trainable in ([param for param in group if param.requires_grad] for group in groups)
        if trainable
    ]
