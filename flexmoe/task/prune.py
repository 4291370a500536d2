"""Expert pruning for token-routed models (NLLB-MoE practice): keep a chosen set of experts
per layer and slice the router's rows to match, so the softmax runs over the kept experts."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from flexmoe.experts import FFNExperts
from flexmoe.layer import MoELayer


def _check_keep(name: str, keep: Sequence[int], num_experts: int) -> list[int]:
    keep = [int(e) for e in keep]
    if not keep or len(set(keep)) != len(keep) or not all(0 <= e < num_experts for e in keep):
        raise ValueError(
            f"keep for layer {name!r} must be a non-empty list of distinct experts in 0..{num_experts - 1}, got {keep}"
        )
    return keep


def prune_layer(layer: MoELayer, keep: Sequence[int]) -> MoELayer:
    """A new MoELayer with only the ``keep`` experts (in that order); top_k capped at len(keep)."""
    if not isinstance(layer.experts, FFNExperts) or layer.experts.num_experts != layer.config.num_experts:
        raise ValueError("prune_layer needs the built-in FFN experts, all held by this process")
    index = torch.tensor(keep, device=layer.experts.w1.device)
    config = dataclasses.replace(layer.config, num_experts=len(keep), top_k=min(layer.config.top_k, len(keep)))
    pruned = MoELayer(config).to(device=layer.experts.w1.device, dtype=layer.experts.w1.dtype)
    source = layer.state_dict()
    sliced = {}
    for key, value in source.items():
        if key.startswith("experts.") or key in ("router.weight", "router.sim_matrix"):
            sliced[key] = value.index_select(0, index)  # expert rows; the rest is shared
        else:
            sliced[key] = value
    pruned.load_state_dict(sliced)
    pruned.train(layer.training)
    return pruned


def prune_experts(model: nn.Module, keep: Sequence[int] | Mapping[str, Sequence[int]]) -> nn.Module:
    """A new copy of ``model`` in which MoE layers keep only some experts.

    keep: one list of expert ids for every MoE layer, or ``{layer name: ids}`` (layers not
    named stay whole; see :meth:`ExpertUsage.top_experts` to choose them by usage). With
    ``normalize_gate`` and every token's top-k inside the kept set, outputs are unchanged.
    The result carries ``pruning_report``: ``{layer name: kept experts}``.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    if isinstance(keep, Mapping):
        unknown = set(keep) - set(layers)
        if unknown:
            raise ValueError(
                f"keep names layers that are not MoE layers: {sorted(unknown)}; MoE layers: {sorted(layers)}"
            )
        plan = dict(keep)
    else:
        plan = {name: keep for name in layers}
    memo: dict[int, nn.Module] = {}
    report = {}
    for name, experts in plan.items():
        layer = layers[name]
        experts = _check_keep(name, experts, layer.config.num_experts)
        memo[id(layer)] = prune_layer(layer, experts)
        report[name] = experts
    pruned = copy.deepcopy(model, memo)
    pruned.pruning_report = report
    return pruned
