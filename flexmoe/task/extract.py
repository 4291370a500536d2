"""Per-task sub-network extraction (Kudugunta et al., 2021, "Beyond Distillation").

With task routing, every token of a task goes to the same top-k experts with the same gate
weights, so a task-routed MoE layer is, for that task, a fixed dense FFN. ``extract_task``
replaces each such layer with that :class:`DenseFFN`: dense-model inference cost, exactly the
MoE model's outputs for the task (when capacity does not bind), no distillation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.experts import FFNExperts
from flexmoe.layer import MoELayer
from flexmoe.task.dense import DenseFFN


@dataclass
class ExtractionReport:
    """What :func:`extract_task` did: reduced layers (name -> experts kept), layers kept whole
    (name -> why), and parameter counts before and after."""

    task_id: int
    reduced: dict[str, tuple[int, ...]] = field(default_factory=dict)
    kept_whole: dict[str, str] = field(default_factory=dict)
    parameters_before: int = 0
    parameters_after: int = 0

    def __str__(self) -> str:
        lines = [
            f"task {self.task_id}: {self.parameters_before:,} -> {self.parameters_after:,} parameters "
            f"({self.parameters_after / max(self.parameters_before, 1):.1%})"
        ]
        lines += [f"  reduced    {name}: experts {list(experts)}" for name, experts in self.reduced.items()]
        lines += [f"  kept whole {name}: {why}" for name, why in self.kept_whole.items()]
        return "\n".join(lines)


def task_gates(layer: MoELayer, task_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed routing of a task-routed layer: (gate weights [k], experts [k]), best first."""
    config = layer.config
    if not 0 <= task_id < config.num_tasks:
        raise ValueError(f"task_id must be in 0..num_tasks-1 = 0..{config.num_tasks - 1}, got {task_id}")
    with torch.no_grad():
        logits = layer.router(layer.task_embedding.weight[task_id : task_id + 1])
        gates, experts = F.softmax(logits, dim=-1).topk(config.top_k, dim=-1)
        if config.normalize_gate:
            gates = gates / gates.sum(-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).eps)
    return gates[0], experts[0]


def dense_block_for_task(layer: MoELayer, task_id: int) -> DenseFFN:
    """Fold a task's top-k experts and gates into one :class:`DenseFFN` (hidden = k * expert hidden)."""
    experts: FFNExperts = layer.experts
    gates, chosen = task_gates(layer, task_id)
    config = layer.config
    fold_dtype = torch.promote_types(experts.w2.dtype, gates.dtype)  # fold in >= float32
    gates = gates.to(fold_dtype)
    block = DenseFFN(
        config.model_dim,
        experts.hidden_dim * len(chosen),
        config.activation,
        bias=experts.b1 is not None,
        gated=experts.w3 is not None,
        task_id=task_id,
        experts=tuple(chosen.tolist()),
    ).to(device=experts.w1.device, dtype=experts.w1.dtype)
    with torch.no_grad():
        block.w1.copy_(torch.cat(list(experts.w1[chosen]), dim=1))
        # Gates folded into the second GEMM: sum_j g_j (h_j @ w2_j + b2_j).
        scaled_w2 = experts.w2[chosen].to(fold_dtype) * gates[:, None, None]
        block.w2.copy_(torch.cat(list(scaled_w2), dim=0))
        if experts.w3 is not None:
            block.w3.copy_(torch.cat(list(experts.w3[chosen]), dim=1))
        if experts.b1 is not None:
            block.b1.copy_(experts.b1[chosen].reshape(-1))
            block.b2.copy_((experts.b2[chosen].to(fold_dtype) * gates[:, None]).sum(0))
    return block


def _why_not_reducible(layer: MoELayer) -> str | None:
    if layer.config.granularity != "task":
        return f"{layer.config.granularity}-routed: its experts depend on the input"
    if not isinstance(layer.experts, FFNExperts):
        return "custom experts: only the built-in FFN experts can be folded"
    if layer.experts.num_experts != layer.config.num_experts:
        return "expert-parallel shards: gather the full model (single process) first"
    return None


def reducible_layers(model: nn.Module) -> list[str]:
    """Names of the :class:`MoELayer` modules that :func:`extract_task` would fold into a
    :class:`DenseFFN` (task-routed, built-in experts, not sharded)."""
    return [
        name or "<root>"
        for name, module in model.named_modules()
        if isinstance(module, MoELayer) and _why_not_reducible(module) is None
    ]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def extract_task(model: nn.Module, task_id: int) -> nn.Module:
    """A new, independent copy of ``model`` for one task.

    Every task-routed :class:`MoELayer` becomes a :class:`DenseFFN` holding only the task's
    top-k experts with their fixed gates; token- and sentence-routed layers are copied whole.
    ``model`` itself is not changed and shares no tensor with the result. The returned
    module carries ``extraction_report`` (:class:`ExtractionReport`).
    """
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise TypeError(f"task_id must be an int, got {task_id!r}")
    report = ExtractionReport(task_id=task_id, parameters_before=count_parameters(model))
    memo: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, MoELayer):
            continue
        why = _why_not_reducible(module)
        if why is not None:
            report.kept_whole[name or "<root>"] = why
            continue
        block = dense_block_for_task(module, task_id)
        memo[id(module)] = block  # deepcopy places the block instead of copying the layer
        report.reduced[name or "<root>"] = block.experts
    extracted = copy.deepcopy(model, memo)
    report.parameters_after = count_parameters(extracted)
    extracted.extraction_report = report
    return extracted
