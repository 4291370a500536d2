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
from torch import nn

from flexmoe.experts import FFNExperts
from flexmoe.layer import MoELayer
from flexmoe.task.dense import DenseFFN
from flexmoe.task.single_process import check_single_process


@dataclass
class ExtractionReport:
    """What :func:`extract_task` did: reduced layers (name -> experts kept), layers kept whole
    (name -> why), what became of each reduced layer's shared experts (name -> how), reduced
    layers whose full version has a capacity limit (name -> the limit: where it binds, the full
    model drops tokens that the dense block keeps), and parameter counts before and after."""

    task_id: int
    reduced: dict[str, tuple[int, ...]] = field(default_factory=dict)
    kept_whole: dict[str, str] = field(default_factory=dict)
    shared_experts: dict[str, str] = field(default_factory=dict)
    capacity_limited: dict[str, str] = field(default_factory=dict)
    parameters_before: int = 0
    parameters_after: int = 0

    def __str__(self) -> str:
        lines = [
            f"task {self.task_id}: {self.parameters_before:,} -> {self.parameters_after:,} parameters "
            f"({self.parameters_after / max(self.parameters_before, 1):.1%})"
        ]
        lines += [f"  reduced    {name}: experts {list(experts)}" for name, experts in self.reduced.items()]
        lines += [f"  shared     {name}: {how}" for name, how in self.shared_experts.items()]
        lines += [
            f"  capacity   {name}: {limit} (equal only where it does not bind)"
            for name, limit in self.capacity_limited.items()
        ]
        lines += [f"  kept whole {name}: {why}" for name, why in self.kept_whole.items()]
        return "\n".join(lines)


def task_gates(layer: MoELayer, task_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed routing of a task-routed layer: (gate weights [k], experts [k]), best first.

    The same routing the layer's forward applies (in eval mode: no gate noise): the configured
    ``score_function``, the choice on ``scores + load_balancer.bias`` inside the task's
    ``top_groups`` best groups, gates = the unbiased scores of the chosen experts, renormalised
    over the k when ``normalize_gate``, times ``route_scale``.
    """
    return layer.routing.task_gates(task_id)


@dataclass
class FoldedUnits:
    """Hidden units of several FFNs side by side, each FFN's output weight folded into its rows:
    w1, w3 [model_dim, h] each; b1 [h]; w2 [h, model_dim] (already multiplied by the FFN's gate);
    b2 [model_dim] the weighted sum of the second biases."""

    w1: list[torch.Tensor] = field(default_factory=list)
    w3: list[torch.Tensor] = field(default_factory=list)
    b1: list[torch.Tensor] = field(default_factory=list)
    w2: list[torch.Tensor] = field(default_factory=list)
    b2: list[torch.Tensor] = field(default_factory=list)

    def add(self, ffn: FFNExperts, index: torch.Tensor, weights: torch.Tensor) -> None:
        """The experts ``index`` [n] of ``ffn``, outputs weighted by ``weights`` [n]."""
        self.w1 += list(ffn.w1[index])
        self.w2 += list(ffn.w2[index].to(weights.dtype) * weights[:, None, None])
        if ffn.w3 is not None:
            self.w3 += list(ffn.w3[index])
        if ffn.b1 is not None:
            self.b1 += list(ffn.b1[index])
            self.b2.append((ffn.b2[index].to(weights.dtype) * weights[:, None]).sum(0))

    @property
    def hidden_dim(self) -> int:
        return sum(w.shape[1] for w in self.w1)

    def copy_into(self, block: DenseFFN) -> None:
        block.w1.copy_(torch.cat(self.w1, dim=1))
        block.w2.copy_(torch.cat(self.w2, dim=0))
        if block.w3 is not None:
            block.w3.copy_(torch.cat(self.w3, dim=1))
        if block.b1 is not None:
            block.b1.copy_(torch.cat(self.b1))
            block.b2.copy_(torch.stack(self.b2).sum(0))


def dense_block_for_task(layer: MoELayer, task_id: int) -> DenseFFN:
    """Fold a task's top-k experts, their gates and the layer's shared experts into one
    :class:`DenseFFN` (hidden = k * expert hidden, plus the ungated shared experts' width; gated
    shared experts become the block's gated branch)."""
    experts: FFNExperts = layer.experts
    gates, chosen = task_gates(layer, task_id)
    config = layer.config
    fold_dtype = torch.promote_types(experts.w2.dtype, gates.dtype)  # fold in >= float32
    units = FoldedUnits()
    with torch.no_grad():
        units.add(experts, chosen, gates.to(fold_dtype))
        shared = layer.shared_experts
        if shared is not None and shared.gate is None:  # a constant weight 1: foldable
            device = shared.ffn.w1.device
            units.add(shared.ffn, torch.zeros(1, dtype=torch.long, device=device), gates.new_ones(1, dtype=fold_dtype))
        gated_shared = shared is not None and shared.gate is not None
        block = DenseFFN(
            config.model_dim,
            units.hidden_dim,
            config.activation,
            bias=experts.b1 is not None,
            gated=experts.w3 is not None,
            task_id=task_id,
            experts=tuple(chosen.tolist()),
            gated_shared_hidden_dim=shared.ffn.hidden_dim if gated_shared else None,
        ).to(device=experts.w1.device, dtype=experts.w1.dtype)
        units.copy_into(block)
        if gated_shared:
            block.shared_experts.load_state_dict(shared.state_dict())
    return block


def _capacity_note(layer: MoELayer) -> str | None:
    config = layer.config
    if config.expert_capacity is not None:
        return f"expert_capacity={config.expert_capacity}"
    if config.capacity_factor > 0:
        return f"capacity_factor={config.capacity_factor}"
    if config.capacity_factor < 0:
        return f"capacity_factor={config.capacity_factor} (capped dropless)"
    return None


def _shared_note(layer: MoELayer) -> str | None:
    shared = layer.shared_experts
    if shared is None:
        return None
    how = "kept as a gated branch (per-token sigmoid gate)" if shared.gate is not None else "folded into the block"
    return f"{shared.num_shared} shared expert(s), width {shared.ffn.hidden_dim}: {how}"


def _why_not_reducible(layer: MoELayer) -> str | None:
    if layer.config.granularity != "task":
        return f"{layer.config.granularity}-routed: its experts depend on the input"
    if not isinstance(layer.experts, FFNExperts):
        return "custom experts: only the built-in FFN experts can be folded"
    if layer.layout.world_size > 1:
        return "expert-parallel shards: load a single-process copy first"
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
    top-k experts with their fixed gates (chosen as the layer chooses them: score function,
    loss-free selection bias, group limit; gates normalised and scaled as configured) and its
    shared experts; token- and sentence-routed layers are copied whole. Outputs equal the full
    model's on inputs of the task when no capacity limit binds in the full model.
    ``model`` itself is not changed and shares no tensor with the result. The returned
    module carries ``extraction_report`` (:class:`ExtractionReport`).

    Raises ValueError for a model holding expert-parallel shards (``layer.layout.world_size > 1``).
    """
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise TypeError(f"task_id must be an int, got {task_id!r}")
    check_single_process(model, "extract_task")
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
        for notes, note in (
            (report.shared_experts, _shared_note(module)),
            (report.capacity_limited, _capacity_note(module)),
        ):
            if note is not None:
                notes[name or "<root>"] = note
    extracted = copy.deepcopy(model, memo)
    report.parameters_after = count_parameters(extracted)
    extracted.extraction_report = report
    return extracted
