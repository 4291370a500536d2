"""FSDP2 (``fully_shard``) on a model with expert-parallel MoE layers, on a 2-D mesh ``(dp, ep)``.

Every rank of the mesh trains on its own data, so everything but the experts is data-parallel
over all ``dp * ep`` ranks: it is sharded over the flattened ``(dp, ep)`` dimension. The
experts are DTensors sharded over ``ep`` (the layers built with ``group=mesh``);
FSDP2 shards each expert shard further over ``dp``, the expert-data-parallel dimension, and
averages its gradient over it (the exchange's backward already averaged over ``ep``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from flexmoe.distributed.experts import expert_parallel_layers, has_plain_expert_shards


def _on_mesh(param: torch.Tensor, mesh: DeviceMesh) -> bool:
    """Whether a DTensor parameter lives on ``mesh`` or a mesh cut out of it."""
    return isinstance(param, DTensor) and param.device_mesh._get_root_mesh() is mesh._get_root_mesh()


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, dp_dim: str = "dp", ep_dim: str = "ep") -> nn.Module:
    """``fully_shard`` ``model`` in place: experts over ``mesh[dp_dim]``, the rest over ``(dp_dim, ep_dim)``.

    mesh: a 2-D DeviceMesh with named dimensions ``dp_dim`` and ``ep_dim``; the MoE layers are
        built on it (``group=mesh`` or ``group=mesh[ep_dim]``), so their expert DTensors live
        on ``mesh[ep_dim]``.
    Each MoE layer becomes one FSDP unit for its experts; its router, task embedding and shared
    experts are units of their own on the data-parallel mesh. Call it after loading or
    initialising the weights and before building the optimizer. Returns ``model`` (now an FSDP module).
    """
    names = mesh.mesh_dim_names or ()
    if mesh.ndim != 2 or dp_dim not in names or ep_dim not in names:
        raise ValueError(
            f"mesh must be a 2-D DeviceMesh with dimensions named {dp_dim!r} and {ep_dim!r} "
            f"(init_device_mesh(device, (dp, ep), mesh_dim_names=({dp_dim!r}, {ep_dim!r}))), "
            f"got {mesh.ndim} dimensions named {names}"
        )
    data_parallel = mesh[dp_dim, ep_dim]._flatten(f"{dp_dim}_{ep_dim}")
    ep_ranks = mesh[ep_dim].mesh.tolist()
    for name, layer in expert_parallel_layers(model):
        if has_plain_expert_shards(layer):
            raise ValueError(
                f"MoE layer {name or '<root>'} holds its experts as plain local shards, which FSDP2 would mix "
                f"up across ranks: call flexmoe.distributed.distribute_experts(model, mesh[{ep_dim!r}]) first"
            )
        if any(not _on_mesh(param, mesh) for param in layer.experts.parameters()):
            raise ValueError(
                f"MoE layer {name or '<root>'} holds its experts on a DeviceMesh of its own (built on a process "
                f"group), which FSDP2 cannot combine with {dp_dim!r}: build it with group=mesh (or mesh[{ep_dim!r}])"
            )
        if layer.groups.global_ranks != ep_ranks:
            raise ValueError(
                f"MoE layer {name or '<root>'} shards its experts over ranks {layer.groups.global_ranks}, "
                f"mesh[{ep_dim!r}] holds ranks {ep_ranks}: build it with group=mesh[{ep_dim!r}].get_group()"
            )
        for child_name, child in layer.named_children():
            if child_name != "experts" and any(True for _ in child.parameters()):
                fully_shard(child, mesh=data_parallel)
        # The layer's own unit holds just the experts; its pre-forward all-gathers them over dp
        # before the layer computes on the local shards.
        fully_shard(layer, mesh=mesh[dp_dim])
    fully_shard(model, mesh=data_parallel)
    return model
