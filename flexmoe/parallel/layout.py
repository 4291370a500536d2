"""The one layout of expert parameters over ``world_size`` ranks (Tutel's "identical layout").

Every parallel method (data, expert, model parallel, any degree ``r``) and every pipelining
depth reads the same per-rank tensors, so switching between them moves no parameter.

* ``num_experts >= world_size`` (must divide): rank ``i`` holds the ``num_experts / world_size``
  whole experts ``[i * local_experts, (i + 1) * local_experts)``.
* ``num_experts < world_size`` (must divide): each expert is split over
  ``shards_per_expert = world_size / num_experts`` consecutive ranks along its hidden dimension;
  rank ``i`` holds expert ``i // shards_per_expert``, hidden slice ``i % shards_per_expert``
  (``hidden_dim / shards_per_expert`` wide, so ``hidden_dim`` must divide too). Parameters that
  have no hidden axis (the second bias ``b2``) are replicated on every shard of their expert.

Each expert parameter is named by how it is cut: :data:`HIDDEN_AXIS` maps a parameter name of
:class:`~flexmoe.FFNExperts` to its hidden axis (``None``: not cut). Axis 0 is always the expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Hidden axis of each built-in expert parameter ([experts, ...] tensors); None = replicated per shard.
HIDDEN_AXIS: dict[str, int | None] = {"w1": 2, "w3": 2, "b1": 1, "w2": 1, "b2": None}


@dataclass(frozen=True)
class ExpertLayout:
    """Where the experts of one MoE layer live for a given world size and rank."""

    num_experts: int
    world_size: int
    rank: int = 0

    def __post_init__(self) -> None:
        for name in ("num_experts", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in 0..world_size-1 = 0..{self.world_size - 1}, got {self.rank!r}")
        big, small = max(self.num_experts, self.world_size), min(self.num_experts, self.world_size)
        if big % small:
            raise ValueError(
                f"num_experts ({self.num_experts}) and world_size ({self.world_size}) must divide one another: "
                "num_experts a multiple of world_size (whole experts per rank) or a divisor of it (sharded experts)"
            )

    @property
    def local_experts(self) -> int:
        """Experts (whole or sharded) stored on each rank."""
        return max(1, self.num_experts // self.world_size)

    @property
    def shards_per_expert(self) -> int:
        """S: ranks one expert is split over (1 when experts >= world size)."""
        return max(1, self.world_size // self.num_experts)

    @property
    def first_expert(self) -> int:
        """Global index of this rank's first local expert."""
        return self.rank // self.shards_per_expert * self.local_experts

    @property
    def shard_index(self) -> int:
        """Which hidden slice of its expert this rank holds (0 when experts are whole)."""
        return self.rank % self.shards_per_expert

    @property
    def expert_slice(self) -> slice:
        return slice(self.first_expert, self.first_expert + self.local_experts)

    def valid_degrees(self) -> list[int]:
        """Parallelism degrees r this layout supports: 0 (data parallel) and the divisors of S."""
        shards = self.shards_per_expert
        return [0] + [d for d in range(1, shards + 1) if shards % d == 0]

    def local_hidden_dim(self, hidden_dim: int) -> int:
        if hidden_dim % self.shards_per_expert:
            raise ValueError(
                f"hidden_dim ({hidden_dim}) must be a multiple of the shards per expert "
                f"(world_size / num_experts = {self.shards_per_expert})"
            )
        return hidden_dim // self.shards_per_expert

    def hidden_slice(self, hidden_dim: int) -> slice:
        width = self.local_hidden_dim(hidden_dim)
        return slice(self.shard_index * width, (self.shard_index + 1) * width)

    def shard(self, full: torch.Tensor, hidden_axis: int | None) -> torch.Tensor:
        """The part of a global expert tensor ``[num_experts, ...]`` this rank stores (a view)."""
        if full.shape[0] != self.num_experts:
            raise ValueError(f"expected a tensor of {self.num_experts} experts on axis 0, got {tuple(full.shape)}")
        local = full[self.expert_slice]
        if hidden_axis is None or self.shards_per_expert == 1:
            return local
        cut = self.hidden_slice(full.shape[hidden_axis])
        return local.narrow(hidden_axis, cut.start, cut.stop - cut.start)


def unshard(shards: Sequence[torch.Tensor], hidden_axis: int | None, num_experts: int) -> torch.Tensor:
    """Rebuild a global expert tensor from every rank's shard (``shards[i]`` from rank i).

    Replicated parameters (``hidden_axis`` None under sharding) take shard 0 of each expert.
    """
    world_size = len(shards)
    layout = ExpertLayout(num_experts, world_size)
    shards_per_expert = layout.shards_per_expert
    per_expert = []
    for first_rank in range(0, world_size, shards_per_expert):
        group = list(shards[first_rank : first_rank + shards_per_expert])
        if hidden_axis is None or shards_per_expert == 1:
            per_expert.append(group[0])
        else:
            per_expert.append(torch.cat(group, dim=hidden_axis))
    return torch.cat(per_expert, dim=0)
