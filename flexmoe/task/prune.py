"""Expert pruning (NLLB-MoE practice): keep a chosen set of experts per layer and slice the
router's rows (and the loss-free selection bias) to match.

What pruning keeps exact, per routing option (for a token whose chosen experts are all kept):
* ``score_function="sigmoid"``: each expert's score is independent of the others, so the kept
  experts' scores, the choice and the gates are unchanged (with or without ``normalize_gate``).
* ``score_function="softmax"``: the softmax runs over the kept experts only, so every score is
  divided by the kept experts' share of the probability mass; the choice is unchanged, and so
  are the gates with ``normalize_gate`` (renormalised over the chosen k); without it they grow.
* ``loss_free_balance``: ``load_balancer.bias`` is sliced with the router rows.
* ``route_scale``, shared experts, the task embedding: kept as they are.
* group-limited routing (``num_groups > 1`` with ``top_groups < num_groups``): see
  :data:`GroupRouting`; with ``top_groups`` covering all groups the grouping is a no-op and
  the pruned layer routes ungrouped.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from flexmoe.config import MoEConfig
from flexmoe.experts import FFNExperts
from flexmoe.layer import MoELayer
from flexmoe.parallel import SINGLE_PROCESS
from flexmoe.task.single_process import check_single_process

# How a pruned layer treats group-limited routing:
# "whole_groups": ``keep`` must list whole groups, each group's experts consecutively; the pruned
#     layer keeps group-limited routing over the kept groups (``top_groups`` capped at their
#     number). Exact for tokens whose ``top_groups`` best groups are all kept.
# "disable": any ``keep``; the pruned layer routes ungrouped, top-k over the kept experts (listed
#     in ``pruning_report``). Exact for tokens whose best groups hold all the kept experts.
GroupRouting = Literal["whole_groups", "disable"]
GROUP_ROUTINGS = ("whole_groups", "disable")


def _check_keep(name: str, keep: Sequence[int], num_experts: int) -> list[int]:
    keep = [int(e) for e in keep]
    if not keep or len(set(keep)) != len(keep) or not all(0 <= e < num_experts for e in keep):
        raise ValueError(
            f"keep for layer {name!r} must be a non-empty list of distinct experts in 0..{num_experts - 1}, got {keep}"
        )
    return keep


def _limits_groups(config: MoEConfig) -> bool:
    return config.num_groups > 1 and config.top_groups is not None and config.top_groups < config.num_groups


def pruned_config(config: MoEConfig, keep: Sequence[int], group_routing: GroupRouting = "whole_groups") -> MoEConfig:
    """The config of ``config``'s layer pruned to the experts ``keep`` (top_k capped at what a
    token can still choose from). Raises ValueError when ``keep`` cannot keep the grouping."""
    if group_routing not in GROUP_ROUTINGS:
        raise ValueError(f"group_routing must be one of {GROUP_ROUTINGS}, got {group_routing!r}")
    if not _limits_groups(config) or group_routing == "disable":
        return dataclasses.replace(
            config, num_experts=len(keep), top_k=min(config.top_k, len(keep)), num_groups=1, top_groups=None
        )
    size = config.num_experts // config.num_groups
    chunks = [list(keep[i : i + size]) for i in range(0, len(keep), size)]
    whole = len(keep) % size == 0 and all(
        sorted(c) == list(range(c[0] // size * size, (c[0] // size + 1) * size)) for c in chunks
    )
    if not whole:
        raise ValueError(
            f"keep {list(keep)} must list whole expert groups (num_groups={config.num_groups}, top_groups="
            f"{config.top_groups}: groups of {size} consecutive experts, each group's experts listed together) "
            "to keep group-limited routing; or pass group_routing='disable' to route the pruned layer ungrouped"
        )
    num_groups = len(chunks)
    top_groups = min(config.top_groups, num_groups)
    return dataclasses.replace(
        config,
        num_experts=len(keep),
        num_groups=num_groups,
        top_groups=top_groups,
        top_k=min(config.top_k, top_groups * size),
    )


def prune_layer(layer: MoELayer, keep: Sequence[int], group_routing: GroupRouting = "whole_groups") -> MoELayer:
    """A new single-process MoELayer with only the ``keep`` experts (in that order): expert
    weights, router rows and the loss-free bias sliced; top_k capped at what can be chosen;
    group-limited routing as ``group_routing`` says (see :data:`GroupRouting`)."""
    if not isinstance(layer.experts, FFNExperts):
        raise ValueError("prune_layer needs the built-in FFN experts (custom experts cannot be sliced)")
    check_single_process(layer, "prune_layer")
    index = torch.tensor(keep, device=layer.experts.w1.device)
    config = pruned_config(layer.config, keep, group_routing)
    pruned = MoELayer(config, group=SINGLE_PROCESS).to(device=layer.experts.w1.device, dtype=layer.experts.w1.dtype)
    sliced = {}
    for key, value in layer.state_dict().items():
        if key.startswith("experts.") or key in ("router.weight", "router.sim_matrix", "load_balancer.bias"):
            sliced[key] = value.index_select(0, index)  # expert rows; the rest is shared
        else:
            sliced[key] = value
    pruned.load_state_dict(sliced)
    pruned.train(layer.training)
    return pruned


def prune_experts(
    model: nn.Module,
    keep: Sequence[int] | Mapping[str, Sequence[int]],
    *,
    group_routing: GroupRouting = "whole_groups",
) -> nn.Module:
    """A new copy of ``model`` in which MoE layers keep only some experts.

    keep: one list of expert ids for every MoE layer, or ``{layer name: ids}`` (layers not
    named stay whole; see :meth:`ExpertUsage.top_experts` to choose them by usage). With every
    token's top-k inside the kept set, outputs are unchanged for sigmoid scores, and for
    softmax scores with ``normalize_gate`` (see this module's docstring for each option).
    group_routing: what layers with group-limited routing do (see :data:`GroupRouting`).
    The result carries ``pruning_report``: ``{layer name: kept experts}``, and
    ``ungrouped_layers``: the layers whose group-limited routing was disabled.

    Raises ValueError for a model holding expert-parallel shards (``layer.layout.world_size > 1``).
    """
    check_single_process(model, "prune_experts")
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
    report, ungrouped = {}, []
    for name, experts in plan.items():
        layer = layers[name]
        experts = _check_keep(name, experts, layer.config.num_experts)
        memo[id(layer)] = prune_layer(layer, experts, group_routing)
        report[name] = experts
        if _limits_groups(layer.config) and group_routing == "disable":
            ungrouped.append(name)
    pruned = copy.deepcopy(model, memo)
    pruned.pruning_report = report
    pruned.ungrouped_layers = ungrouped
    return pruned
