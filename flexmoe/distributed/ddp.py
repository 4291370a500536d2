"""DistributedDataParallel on models with expert-parallel layers.

DDP treats every parameter as a replica: it would broadcast rank 0's expert shards over the
others' at construction and average different experts' gradients. The expert parameters must
be left out, which DDP reads from one place only, the ROOT module's
``_ddp_params_and_buffers_to_ignore``. flexmoe keeps that list up to date with no extra step:
an expert-parallel layer marks its experts, and a module-registration hook (installed once, on
import of this module) adds the marked names to every module a marked one is registered into,
so a model built the usual way (children made in the parent's ``__init__``) carries them at its
root. A layer put into a model whose root was already built (``model.block.mlp = MoELayer(...)``)
reaches its parent only: then call :func:`exclude_experts_from_ddp` on the root
(:func:`flexmoe.to_flexmoe` does for the models it converts). The expert gradients need no
averaging: the exchange's backward already gives each shard the mean over ranks' losses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook
from torch.nn.parallel import DistributedDataParallel

from flexmoe.parallel.data_parallel import expert_parameters

FIX = "call flexmoe.distributed.exclude_experts_from_ddp(model) before DistributedDataParallel(model)"
_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"  # the attribute DDP reads from the root module
_MARKED = "_flexmoe_ddp_ignore"  # the names flexmoe put there (relative to the module)


def exclude_experts_from_ddp(model: nn.Module) -> nn.Module:
    """Tell DistributedDataParallel to leave out the expert parameters of ``model``; call on the
    module you then wrap. Keeps names already excluded. Returns ``model``."""
    names = set(getattr(model, _DDP_IGNORE, ()))
    names.update(name for name, _ in expert_parameters(model))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(names))
    return model


def mark_experts_for_ddp(layer: nn.Module) -> None:
    """At an expert-parallel layer's construction: its expert parameters are left out by the DDP
    of any model it is built into (see the module docstring)."""
    _set_marked(layer.experts, {name for name, _ in layer.experts.named_parameters()})
    for param in layer.experts.parameters():
        param._ddp_ignored = True  # what DDP's own helper sets (its mixed precision skips them)
    _propagate(layer, "experts", layer.experts)


def _set_marked(module: nn.Module, marked: Iterable[str]) -> None:
    marked = frozenset(marked)
    previous = module.__dict__.get(_MARKED, frozenset())
    ignored = (set(module.__dict__.get(_DDP_IGNORE, ())) - previous) | marked
    module.__dict__[_MARKED] = marked
    module.__dict__[_DDP_IGNORE] = sorted(ignored)


def _propagate(parent: nn.Module, name: str, child: nn.Module | None) -> None:
    """Module-registration hook: ``parent``'s marked names under ``name`` become ``child``'s."""
    inherited = parent.__dict__.get(_MARKED, frozenset())
    below = frozenset() if child is None else child.__dict__.get(_MARKED, frozenset())
    prefix = name + "."
    stale = {marked for marked in inherited if marked.startswith(prefix)}
    if stale or below:
        _set_marked(parent, (inherited - stale) | {prefix + marked for marked in below})


# Owned by this module for the life of the process; it touches modules holding flexmoe's mark only.
_REGISTRATION_HOOK = register_module_module_registration_hook(_propagate)


def refuse_experts_under_ddp(layer: nn.Module, args: Any) -> None:
    """Forward pre-hook of an expert-parallel layer: raise if the DistributedDataParallel running
    this forward manages (and so overwrote and averages) its expert parameters."""
    ddp = DistributedDataParallel._get_active_ddp_module()
    if ddp is None:
        return
    managed = {id(param) for param in ddp._module_parameters}
    if any(id(param) in managed for param in layer.experts.parameters()):
        raise ValueError(
            "DistributedDataParallel manages the expert parameters of an expert-parallel MoE layer: it "
            f"overwrote each rank's experts with rank 0's and would average different experts; {FIX} "
            "(and rebuild or reload the model)"
        )
