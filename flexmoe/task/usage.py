"""Expert usage from real data, overall or per task: the input to usage-based pruning."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flexmoe.layer import MoELayer
from flexmoe.routing.granularity import token_task_ids


@dataclass
class ExpertUsage:
    """counts[layer name]: [num_tasks, num_experts] (token, choice) pairs each expert took per
    task (one row, task 0, when not collected by task)."""

    counts: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, layer_name: str, task: torch.Tensor, expert: torch.Tensor, num_experts: int) -> None:
        num_tasks = int(task.max()) + 1 if task.numel() else 1
        flat = torch.bincount(task * num_experts + expert, minlength=num_tasks * num_experts)
        new = flat.reshape(num_tasks, num_experts).cpu()
        old = self.counts.get(layer_name, torch.zeros(0, num_experts, dtype=torch.long))
        rows = max(len(old), len(new))
        total = torch.zeros(rows, num_experts, dtype=torch.long)
        total[: len(old)] += old
        total[: len(new)] += new
        self.counts[layer_name] = total

    def _usage_row(self, name: str, task: int | None) -> torch.Tensor:
        counts = self.counts[name]
        return counts.sum(0) if task is None else (counts[task] if task < len(counts) else counts[0] * 0)

    def top_experts(self, m: int, task: int | None = None) -> dict[str, list[int]]:
        """Per layer, the ``m`` most used experts (of ``task``, or over all tasks), most used first."""
        keep = {}
        for name in self.counts:
            row = self._usage_row(name, task)
            keep[name] = torch.argsort(row, descending=True, stable=True)[: min(m, len(row))].tolist()
        return keep

    def top_groups(self, m: int, num_groups: int, task: int | None = None) -> dict[str, list[int]]:
        """Per layer, the experts of its ``m`` most used groups (``num_groups`` equal contiguous
        groups, as group-limited routing forms them), most used group first, each group's experts
        together: a ``keep`` that :func:`flexmoe.prune_experts` accepts for group-limited layers."""
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        keep = {}
        for name in self.counts:
            row = self._usage_row(name, task)
            if len(row) % num_groups:
                raise ValueError(f"num_groups ({num_groups}) must divide layer {name!r}'s {len(row)} experts")
            size = len(row) // num_groups
            groups = torch.argsort(row.view(num_groups, size).sum(1), descending=True, stable=True)[:m].tolist()
            keep[name] = [group * size + e for group in groups for e in range(size)]
        return keep


def expert_usage(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    by_task: bool = False,
    forward: Callable[[nn.Module, Mapping[str, Any]], Any] | None = None,
) -> ExpertUsage:
    """Run ``model`` over ``batches`` (no grad) and count which experts each MoE layer used.

    forward: how to call the model on a batch (default ``model(**batch)``). With ``by_task``
    the counts are split by the ``task_ids`` each MoE layer receives (the convention for
    multi-task models: pass ``task_ids`` to every MoE layer; token layers ignore it).
    """
    forward = forward or (lambda module, batch: module(**batch))
    usage = ExpertUsage()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    if not layers:
        raise ValueError("model has no MoELayer")

    def hook(name: str) -> Callable:
        def record(layer: MoELayer, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            plan = layer.last_plan
            x = args[0] if args else kwargs["x"]
            if by_task:
                if kwargs.get("task_ids") is None:
                    raise ValueError(f"by_task=True but MoE layer {name!r} received no task_ids")
                task = token_task_ids(kwargs["task_ids"], x, 2**62)
                mask = kwargs.get("padding_mask")
                if mask is not None:
                    task = task[~mask.reshape(-1)]
                task = task[plan.token_index]
            else:
                task = torch.zeros_like(plan.expert_index)
            usage.add(name, task, plan.expert_index, layer.config.num_experts)

        return record

    handles = [m.register_forward_hook(hook(name), with_kwargs=True) for name, m in layers.items()]
    for m in layers.values():
        m.record_plan = True
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
        for m in layers.values():
            m.record_plan, m.last_plan = False, None
    return usage
