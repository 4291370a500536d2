"""Expert-parallel layers with DTensor expert parameters: the global view for state dicts, DCP,
FSDP2 and gradient clipping, while the kernels compute on this rank's local shard.

An expert-parallel :class:`~flexmoe.MoELayer` holds each expert parameter (this rank's shard, as
:class:`~flexmoe.parallel.ExpertLayout` places it) as a DTensor parameter of the global shape
``[num_experts, ...]`` with the placements of :mod:`flexmoe.distributed.placements`, on its
expert-parallel mesh (the ``DeviceMesh`` it was given, or one over its process group): the
built-in experts, and custom experts that declare a ``hidden_axis`` dict. Other custom experts
keep plain local shards; ``distribute_experts(model, ep_mesh)`` makes those DTensors (call it
before building the optimizer: it replaces the parameter objects).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from flexmoe.distributed.placements import (
    ExpertPlacement,
    expert_hidden_axes,
    expert_mesh,
    expert_placement,
    global_expert_shape,
)
from flexmoe.experts import FFNExperts

_MESH_ATTRIBUTE = "_flexmoe_expert_mesh"


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every :class:`~flexmoe.MoELayer` in ``model``."""
    from flexmoe.layer import MoELayer  # here: flexmoe.layer imports this package's DDP guard

    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoELayer)]


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every MoE layer of ``model`` whose experts are sharded over more than one rank."""
    return [(name, layer) for name, layer in moe_layers(model) if layer.layout.world_size > 1]


def has_plain_expert_shards(layer: nn.Module) -> bool:
    """Whether an expert-parallel layer still holds its expert shards as plain tensors, which
    state dicts, DCP, DDP and FSDP2 would take for replicated copies of one tensor."""
    return layer.layout.world_size > 1 and any(not isinstance(p, DTensor) for p in layer.experts.parameters())


def expert_mesh_of(layer: nn.Module) -> DeviceMesh:
    """The mesh of a layer's expert DTensors, on its groups' ep mesh (collective over the group
    the first time when experts are fewer than ranks; shared by the layers of one groups object)."""
    mesh = layer.__dict__.get(_MESH_ATTRIBUTE)
    if mesh is None:
        meshes, num_experts = layer.groups.expert_meshes, layer.config.num_experts
        if num_experts not in meshes:
            meshes[num_experts] = expert_mesh(layer.groups.ep_mesh, num_experts)
        mesh = layer.__dict__[_MESH_ATTRIBUTE] = meshes[num_experts]
    return mesh


def distribute_layer_experts(layer: nn.Module) -> None:
    """At an expert-parallel layer's construction: its expert parameters as DTensors on
    :func:`expert_mesh_of`, for the built-in experts and custom ones with a ``hidden_axis`` dict."""
    experts = layer.experts
    if layer.layout.world_size > 1 and (isinstance(experts, FFNExperts) or hasattr(experts, "hidden_axis")):
        _distribute_layer(layer, expert_mesh_of(layer))


def plain_shard_placements(model: nn.Module) -> dict[str, tuple[ExpertPlacement, torch.Size]]:
    """state_dict key -> (placement, global shape) of every expert parameter held as a plain
    local shard by an expert-parallel layer of ``model``: how to view it as a DTensor."""
    placements = {}
    for name, layer in expert_parallel_layers(model):
        if not has_plain_expert_shards(layer):
            continue
        axes = expert_hidden_axes(layer.experts)
        prefix = f"{name}.experts." if name else "experts."
        for param_name, param in layer.experts.named_parameters():
            mesh = expert_mesh_of(layer)
            shape = global_expert_shape(param.shape, layer.layout, axes[param_name])
            placements[prefix + param_name] = (expert_placement(mesh, axes[param_name]), shape)
    return placements


def distribute_experts(model: nn.Module, ep_mesh: DeviceMesh | None = None) -> nn.Module:
    """Make the expert parameters of every expert-parallel MoE layer of ``model`` DTensors (in place).

    ep_mesh: the 1-D expert-parallel mesh (``mesh["ep"]`` of a larger one, so FSDP2 can combine
        it with the data-parallel dimension); its ranks must be the layers' group. None: each
        layer's own (the mesh it was given, else one over its process group).
    Collective over each layer's group when experts are fewer than ranks (the ep dimension is
    split into ``(experts, shards)``). Layers already distributed are left alone. Returns ``model``.
    """
    meshes: dict[tuple[int, int], DeviceMesh] = {}  # (id of the ep mesh, num_experts) -> expert mesh
    for name, layer in expert_parallel_layers(model):
        if not has_plain_expert_shards(layer):
            continue
        if ep_mesh is None:
            _distribute_layer(layer, expert_mesh_of(layer))
            continue
        _check_mesh_ranks(name, layer, ep_mesh)
        key = (id(ep_mesh), layer.config.num_experts)
        if key not in meshes:
            meshes[key] = expert_mesh(ep_mesh, layer.config.num_experts)
        _distribute_layer(layer, meshes[key])
    return model


def _check_mesh_ranks(name: str, layer: nn.Module, mesh: DeviceMesh) -> None:
    if mesh.ndim != 1:
        raise ValueError(f"ep_mesh must be a 1-D DeviceMesh (e.g. mesh['ep']), got {mesh.ndim} dimensions")
    mesh_ranks = dist.get_process_group_ranks(mesh.get_group())
    if mesh_ranks != layer.groups.global_ranks:
        raise ValueError(
            f"MoE layer {name or '<root>'} shards its experts over ranks {layer.groups.global_ranks}, ep_mesh "
            f"holds ranks {mesh_ranks}: build the layer with group=ep_mesh.get_group() or pass its mesh"
        )


def _distribute_layer(layer: nn.Module, mesh: DeviceMesh) -> None:
    layout = layer.layout
    axes = expert_hidden_axes(layer.experts)
    for param_name, param in list(layer.experts.named_parameters()):
        owner_name, _, attribute = param_name.rpartition(".")
        owner = layer.experts.get_submodule(owner_name)
        placement = expert_placement(mesh, axes[param_name])
        dtensor = placement.to_dtensor(param.detach(), global_expert_shape(param.shape, layout, axes[param_name]))
        setattr(owner, attribute, nn.Parameter(dtensor, requires_grad=param.requires_grad))
    layer.__dict__[_MESH_ATTRIBUTE] = mesh
    # Today's kernels read the experts' attributes (w1, ...): during the layer's forward they see
    # the local shards (registered after FSDP2's pre-forward hook runs, which prepends its own).
    layer.register_forward_pre_hook(_use_local_shards)
    layer.register_forward_hook(_drop_local_shards, always_call=True)


def _dtensor_parameters(experts: nn.Module) -> list[tuple[nn.Module, str, DTensor]]:
    return [
        (module, name, param)
        for module in experts.modules()
        for name, param in module._parameters.items()
        if isinstance(param, DTensor)
    ]


def _use_local_shards(layer: nn.Module, args: Any) -> None:
    # An instance attribute shadows the parameter of the same name; to_local keeps the gradient path.
    for module, name, param in _dtensor_parameters(layer.experts):
        module.__dict__[name] = param.to_local()


def _drop_local_shards(layer: nn.Module, args: Any, output: Any) -> None:
    for module, name, _ in _dtensor_parameters(layer.experts):
        module.__dict__.pop(name, None)


@contextmanager
def local_expert_shards(layer: nn.Module) -> Iterator[None]:
    """Inside: the layer's DTensor expert parameters read as their local shards (as during its
    forward), for code that runs the experts outside ``forward``."""
    shadowed = any(name in module.__dict__ for module, name, _ in _dtensor_parameters(layer.experts))
    if shadowed:  # already inside the layer's forward
        yield
        return
    _use_local_shards(layer, ())
    try:
        yield
    finally:
        _drop_local_shards(layer, (), None)
