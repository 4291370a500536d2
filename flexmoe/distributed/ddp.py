"""DistributedDataParallel on models with expert-parallel layers.

DDP treats every parameter as a replica: it would broadcast rank 0's expert shards over the
others' at construction and average different experts' gradients. The expert parameters must
be left out, which DDP reads from one place only, the ROOT module's
``_ddp_params_and_buffers_to_ignore``: :func:`exclude_experts_from_ddp` sets it
(:func:`flexmoe.to_flexmoe` does for the models it converts). The expert gradients need no
averaging: the exchange's backward already gives each shard the mean over ranks' losses.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from flexmoe.parallel.data_parallel import expert_parameters

FIX = "call flexmoe.distributed.exclude_experts_from_ddp(model) before DistributedDataParallel(model)"


def exclude_experts_from_ddp(model: nn.Module) -> nn.Module:
    """Tell DistributedDataParallel to leave out the expert parameters of ``model``; call on the
    module you then wrap. Keeps names already excluded. Returns ``model``."""
    names = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    names.update(name for name, _ in expert_parameters(model))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(names))
    return model


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
