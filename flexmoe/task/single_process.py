"""Deployment works on whole layers: refuse expert-parallel shards with a clear error."""

from __future__ import annotations

from torch import nn

from flexmoe.layer import MoELayer


def check_single_process(model: nn.Module, action: str) -> None:
    """Raise ValueError if any :class:`MoELayer` of ``model`` holds only its rank's expert shards
    (``layer.layout.world_size > 1``): folding or slicing experts needs all of them."""
    for name, module in model.named_modules():
        if isinstance(module, MoELayer) and module.layout.world_size > 1:
            layout = module.layout
            raise ValueError(
                f"{action} needs every expert in one process, but MoE layer {name or '<root>'!r} holds only "
                f"rank {layout.rank}'s shard of {layout.num_experts} experts (world_size={layout.world_size}); "
                "load a single-process copy first: build the model with group=flexmoe.parallel.SINGLE_PROCESS and "
                "load the saved checkpoint into it with flexmoe.load_checkpoint(directory, model)"
            )
