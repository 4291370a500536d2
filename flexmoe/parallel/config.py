"""How an MoE layer runs over a process group: the default parallel degree, pipelining, all-to-all."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

A2AAlgorithm = Literal["linear", "2dh"]
A2A_ALGORITHMS: tuple[str, ...] = ("linear", "2dh")
# Pipelining depths offered to a tuner by MoELayer.valid_parallel_choices().
OVERLAP_CANDIDATES: tuple[int, ...] = (1, 2, 4)


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``; TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_overlap_degree(overlap_degree: object) -> int:
    return check_int("overlap_degree", overlap_degree, 1)


def check_parallel_config(parallel: object) -> ParallelConfig:
    """None -> the defaults; a ParallelConfig as is; anything else is a TypeError."""
    if parallel is None:
        return ParallelConfig()
    if not isinstance(parallel, ParallelConfig):
        raise TypeError(f"parallel must be a flexmoe.parallel.ParallelConfig, got {type(parallel).__name__}")
    return parallel


def check_a2a_algorithm(a2a_algorithm: object) -> str:
    if a2a_algorithm not in A2A_ALGORITHMS:
        raise ValueError(f"a2a_algorithm must be one of {A2A_ALGORITHMS}, got {a2a_algorithm!r}")
    return a2a_algorithm


@dataclass(frozen=True, order=True)
class ParallelChoice:
    """One way to run the expert step; every valid choice gives the same result.

    Frozen and hashable; ordered by its fields (the run-time tuner's tie-break). The tuner's
    ``flexmoe.tuner.Choice`` is this class.

    parallel_degree: r, 0 (data parallel: gather every expert) or a divisor of the shards per
        expert S (r = 1: expert parallel; r = S: expert + model parallel).
    overlap_degree: d, chunks of the capacity axis whose all-to-all overlaps expert compute.
    a2a_algorithm: ``"linear"`` (one all_to_all_single) or ``"2dh"`` (intra-node then inter-node).
    exact: True: exactly the routed rows are exchanged and computed (variable splits, experts on
        exact counts; built-in experts, ``"linear"``); False: the padded
        ``[num_experts, capacity, model_dim]`` blocks, capacity the largest of any rank.
    """

    parallel_degree: int
    overlap_degree: int = 1
    a2a_algorithm: A2AAlgorithm = "linear"
    exact: bool = False

    def __post_init__(self) -> None:
        check_int("parallel_degree", self.parallel_degree, 0)
        check_overlap_degree(self.overlap_degree)
        check_a2a_algorithm(self.a2a_algorithm)
        check_bool("exact", self.exact)
        if self.exact and self.a2a_algorithm == "2dh":
            raise ValueError("exact=True runs the 'linear' all-to-all; a2a_algorithm='2dh' exchanges padded blocks")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ParallelChoice:
        return cls(**data)


@dataclass(frozen=True)
class ParallelConfig:
    """Defaults of a distributed MoE layer (each can be overridden per call).

    parallel_degree: default r (1 = expert parallel, valid for every layout).
    overlap_degree: default pipelining depth d.
    a2a_algorithm: default all-to-all algorithm.
    local_world_size: ranks per node for ``"2dh"``; None = torchrun's ``LOCAL_WORLD_SIZE``
        read once when the layer is built (so one machine can simulate several nodes).
    exact: run on exact token counts where the choice allows it (built-in experts, ``"linear"``);
        False: always the padded blocks (see :class:`ParallelChoice`).
    """

    parallel_degree: int = 1
    overlap_degree: int = 1
    a2a_algorithm: A2AAlgorithm = "linear"
    local_world_size: int | None = None
    exact: bool = True

    def __post_init__(self) -> None:
        ParallelChoice(self.parallel_degree, self.overlap_degree, self.a2a_algorithm)
        check_bool("exact", self.exact)
        size = self.local_world_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"local_world_size must be an int >= 1 or None, got {size!r}")

    def default_choice(self, exact_possible: bool = True) -> ParallelChoice:
        """The default choice; exact when asked for and ``exact_possible`` (built-in experts)."""
        exact = self.exact and exact_possible and self.a2a_algorithm == "linear"
        return ParallelChoice(self.parallel_degree, self.overlap_degree, self.a2a_algorithm, exact)
