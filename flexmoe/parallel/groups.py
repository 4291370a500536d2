"""The process group of an MoE layer and the sub-groups its parallel methods use.

A :class:`ParallelGroups` owns every sub-group it creates (no module-level cache). Sub-groups
are created on first use with ``use_local_synchronization=True``, so only their members take
part, and since every rank of the layer's group runs the same (agreed) choice, they are
created in the same order everywhere. Share one object between layers to share sub-groups.

Ranks below are positions in the layer's group (0..world_size-1), not global ranks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from flexmoe.parallel.layout import ExpertLayout


class _SingleProcess:
    def __repr__(self) -> str:
        return "flexmoe.parallel.SINGLE_PROCESS"


# ``MoELayer(..., group=SINGLE_PROCESS)``: a local layer, the same as ``group=None``.
SINGLE_PROCESS = _SingleProcess()


def _local_world_size_from_torchrun() -> int | None:
    # torchrun's documented variable: ranks started on this node.
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value else None


class ParallelGroups:
    """A process group and its sub-groups (expert shards, weight-gather blocks, all-to-all, 2dh).

    group: a ``torch.distributed`` process group (None = the default world group).
    local_world_size: ranks per node for the 2dh all-to-all (None = torchrun's
        ``LOCAL_WORLD_SIZE``, else the whole group is one node).
    mesh: the 1-D DeviceMesh over ``group`` that the layers' expert DTensors live on (None:
        one over ``group`` is made on first use, see :attr:`ep_mesh`).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        local_world_size: int | None = None,
        mesh: DeviceMesh | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("ParallelGroups needs torch.distributed initialised (init_process_group)")
        self.group = group if group is not None else dist.group.WORLD
        self.global_ranks: list[int] = dist.get_process_group_ranks(self.group)
        self.world_size = len(self.global_ranks)
        self.rank = dist.get_rank(self.group)
        if local_world_size is None:
            # A group inside one node (torchrun's node size >= the group's) is one node.
            local_world_size = min(_local_world_size_from_torchrun() or self.world_size, self.world_size)
        if local_world_size < 1 or self.world_size % local_world_size:
            raise ValueError(
                f"local_world_size ({local_world_size}) must divide the group's world size ({self.world_size})"
            )
        self.local_world_size = local_world_size
        self._subgroups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        self._mesh = mesh
        # num_experts -> the mesh expert DTensors live on (flexmoe.distributed.placements.expert_mesh),
        # shared by the layers of these groups so that E < W makes its sub-meshes once.
        self.expert_meshes: dict[int, DeviceMesh] = {}

    def __deepcopy__(self, memo: dict) -> ParallelGroups:
        # Process groups are communicators, not data: copies of a layer share them.
        return self

    def __repr__(self) -> str:
        return f"ParallelGroups(world_size={self.world_size}, rank={self.rank}, local={self.local_world_size})"

    @property
    def collective_device(self) -> torch.device:
        """Where tensors of host-side collectives (setting checks, construction broadcast) must be:
        the current CUDA device for a pure NCCL group, else the CPU."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def ep_mesh(self) -> DeviceMesh:
        """The 1-D expert-parallel DeviceMesh: the one given, else one over :attr:`group` (reusing
        it, no new communicator) for the device its backend serves (CUDA for NCCL, else CPU)."""
        if self._mesh is None:
            backend = str(dist.get_backend(self.group))
            device_type = "cuda" if "nccl" in backend and torch.cuda.is_available() else "cpu"
            self._mesh = DeviceMesh.from_group(self.group, device_type, mesh_dim_names=("ep",))
        return self._mesh

    def broadcast_from_first_rank(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` (in place, any device) with the group's first rank's values."""
        device = self.collective_device
        for tensor in tensors:
            staged = tensor.detach().to(device)
            dist.broadcast(staged, src=self.global_ranks[0], group=self.group)
            with torch.no_grad():
                tensor.copy_(staged)

    def subgroup(self, members: Sequence[int]) -> dist.ProcessGroup:
        """The process group of ``members`` (group positions, must include this rank), made once."""
        key = tuple(sorted(members))
        if self.rank not in key:
            raise ValueError(f"rank {self.rank} is not among the sub-group members {key}")
        if key == tuple(range(self.world_size)):
            return self.group
        if key not in self._subgroups:
            ranks = [self.global_ranks[i] for i in key]
            self._subgroups[key] = dist.new_group(ranks, use_local_synchronization=True)
        return self._subgroups[key]

    # --- the sub-groups of the parallel methods ------------------------------------------

    def shard_group(self, layout: ExpertLayout) -> dist.ProcessGroup:
        """The S ranks holding a hidden slice of this rank's expert."""
        shards = layout.shards_per_expert
        first = self.rank - self.rank % shards
        return self.subgroup(range(first, first + shards))

    def gather_block(self, layout: ExpertLayout, parallel_degree: int) -> dist.ProcessGroup:
        """The S / r consecutive shard ranks whose slices make up this rank's hidden slice at degree r."""
        block = layout.shards_per_expert // parallel_degree
        first = self.rank - self.rank % block
        return self.subgroup(range(first, first + block))

    def a2a_members(self, layout: ExpertLayout, parallel_degree: int) -> list[int]:
        """Ranks exchanging tokens at degree r >= 1: those at this rank's position inside its
        gather block, ``world_size * r / S`` of them (every rank when r = S)."""
        block = layout.shards_per_expert // parallel_degree
        position = self.rank % block
        return [i for i in range(self.world_size) if i % block == position]

    def a2a_group(self, layout: ExpertLayout, parallel_degree: int) -> dist.ProcessGroup:
        return self.subgroup(self.a2a_members(layout, parallel_degree))

    def supports_2dh(self, layout: ExpertLayout, parallel_degree: int) -> bool:
        """2dh needs the whole group in the all-to-all and at least two nodes of two ranks."""
        whole = len(self.a2a_members(layout, parallel_degree)) == self.world_size
        return whole and 1 < self.local_world_size < self.world_size

    def node_group(self) -> dist.ProcessGroup:
        """The ranks of this rank's node (contiguous blocks of ``local_world_size``)."""
        first = self.rank - self.rank % self.local_world_size
        return self.subgroup(range(first, first + self.local_world_size))

    def cross_node_group(self) -> dist.ProcessGroup:
        """The ranks with this rank's local rank, one per node."""
        local = self.rank % self.local_world_size
        return self.subgroup(range(local, self.world_size, self.local_world_size))


def resolve_groups(group: object, local_world_size: int | None = None) -> ParallelGroups | None:
    """A layer's ``group`` argument -> its :class:`ParallelGroups`, or None for single-process.

    Expert parallelism is explicit: None (and :data:`SINGLE_PROCESS`) keep the layer local, also
    when torch.distributed runs (data parallelism then treats it as any module). A process group,
    a 1-D ``DeviceMesh`` or a mesh with an ``"ep"`` dimension (its process group is used), or a
    shared :class:`ParallelGroups` make it expert-parallel.
    """
    if group is None or group is SINGLE_PROCESS:
        return None
    if isinstance(group, ParallelGroups):
        return group
    if dist.is_available() and isinstance(group, DeviceMesh):
        mesh = _ep_mesh(group)
        return ParallelGroups(mesh.get_group(), local_world_size, mesh)
    if dist.is_available() and isinstance(group, dist.ProcessGroup):
        return ParallelGroups(group, local_world_size)
    raise TypeError(
        "group must be a torch.distributed ProcessGroup, a DeviceMesh, a flexmoe.parallel.ParallelGroups, "
        f"or None (single process), got {type(group).__name__}"
    )


def _ep_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """A 1-D mesh itself, or the ``"ep"`` dimension of a larger one."""
    if mesh.ndim == 1:
        return mesh
    names = mesh.mesh_dim_names or ()
    if "ep" not in names:
        raise ValueError(
            f"a {mesh.ndim}-D DeviceMesh needs a dimension named 'ep' for expert parallelism "
            f"(its dimensions: {names or 'unnamed'}); pass mesh['ep'] or a 1-D mesh"
        )
    return mesh["ep"]
