"""Where an expert-parallel layer's expert parameters live, as DTensor placements on a DeviceMesh.

The per-rank shards are the ones of :class:`~flexmoe.parallel.ExpertLayout` (E experts over the
W ranks of the expert-parallel mesh dimension); as DTensors they carry the global shape
``[E, ...]`` and these placements:

* ``E >= W`` (whole experts): a 1-D mesh, the ep dimension itself; every parameter
  ``[Shard(0)]`` (rank i holds experts ``[i * E / W, (i + 1) * E / W)``).
* ``E < W`` (each expert split over ``S = W / E`` ranks along its hidden axis): the ep
  dimension unflattened into a 2-D mesh ``(E, S)``, named ``<ep>_experts`` and ``<ep>_shards``;
  a parameter with a hidden axis ``a`` (w1, w3: 2; b1, w2: 1) is ``[Shard(0), Shard(a)]``, one
  without (b2) ``[Shard(0), Replicate()]`` (the S shards of an expert hold the same b2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from flexmoe.parallel.layout import HIDDEN_AXIS, ExpertLayout


@dataclass(frozen=True)
class ExpertPlacement:
    """How one expert parameter ``[num_experts, ...]`` is laid out over the expert-parallel ranks."""

    mesh: DeviceMesh
    placements: tuple[Placement, ...]

    def to_dtensor(self, local: torch.Tensor, global_shape: torch.Size) -> DTensor:
        """This rank's shard (``ExpertLayout.shard`` of the global tensor) -> the DTensor; no communication."""
        stride = torch.empty(global_shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, self.placements, run_check=False, shape=global_shape, stride=stride)


def expert_mesh(ep_mesh: DeviceMesh, num_experts: int) -> DeviceMesh:
    """The mesh expert DTensors live on: ``ep_mesh`` (1-D) itself when ``num_experts >= W``, else
    ``ep_mesh`` unflattened to ``(num_experts, W / num_experts)`` (collective over ``ep_mesh``)."""
    if ep_mesh.ndim != 1:
        raise ValueError(f"ep_mesh must be a 1-D DeviceMesh (e.g. mesh['ep']), got {ep_mesh.ndim} dimensions")
    layout = ExpertLayout(num_experts, ep_mesh.size())
    if layout.shards_per_expert == 1:
        return ep_mesh
    name = (ep_mesh.mesh_dim_names or ("ep",))[0]
    return ep_mesh._unflatten(0, (num_experts, layout.shards_per_expert), (f"{name}_experts", f"{name}_shards"))


def expert_placement(mesh: DeviceMesh, hidden_axis: int | None) -> ExpertPlacement:
    """The placement of a parameter with ``hidden_axis`` (None: none) on :func:`expert_mesh`'s mesh."""
    if mesh.ndim == 1:
        return ExpertPlacement(mesh, (Shard(0),))
    return ExpertPlacement(mesh, (Shard(0), Replicate() if hidden_axis is None else Shard(hidden_axis)))


def global_expert_shape(local_shape: torch.Size, layout: ExpertLayout, hidden_axis: int | None) -> torch.Size:
    """The global shape ``[num_experts, ...]`` of an expert parameter whose shard has ``local_shape``."""
    shape = list(local_shape)
    shape[0] = layout.num_experts
    if hidden_axis is not None:
        shape[hidden_axis] *= layout.shards_per_expert
    return torch.Size(shape)


def expert_hidden_axes(experts: nn.Module) -> dict[str, int | None]:
    """Parameter name -> hidden axis (None: not cut) of an experts module: its ``hidden_axis`` dict
    attribute, else the built-in experts' :data:`~flexmoe.parallel.HIDDEN_AXIS`."""
    axes = getattr(experts, "hidden_axis", HIDDEN_AXIS)
    unknown = [name for name, _ in experts.named_parameters() if name not in axes]
    if unknown:
        raise ValueError(
            f"expert parameters {unknown} have no known layout: give the experts module a hidden_axis dict "
            f"(parameter name -> hidden axis or None), known: {sorted(axes)}"
        )
    return axes


def shard_like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's shard) as a DTensor placed as ``param`` when that is one, else itself."""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (differentiable), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
