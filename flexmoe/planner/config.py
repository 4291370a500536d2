"""What the planner is asked about: a cluster (:class:`ClusterConfig`, with presets) and one MoE
layer's workload (:class:`LayerShape`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flexmoe.config import CAPACITY_FACTOR_LIMIT
from flexmoe.parallel.config import check_int

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_dtype(name: str, dtype: object) -> str:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{name} must be one of {tuple(DTYPE_BYTES)}, got {dtype!r}")
    return dtype


@dataclass(frozen=True)
class ClusterConfig:
    """A cluster in alpha-beta terms. Seconds and bytes per second throughout.

    gpus_per_node: devices sharing the fast intra-node fabric (NVLink; loopback on one machine).
    intra_node_latency / inter_node_latency: alpha, the fixed cost of one message to one peer.
    intra_node_bandwidth / inter_node_bandwidth: what one device sends per second to peers
        inside / outside its node (inter-node: the device's share of the node's NICs).
    gemm_throughput: achieved FLOP/s of the expert GEMMs, by dtype name (``"bfloat16"``...).
    memory_bandwidth: achieved bytes/s of the local copies (dispatch, regroups, partial sums).
    op_overhead: fixed seconds per operation issued (a kernel launch, a collective's set-up):
        what makes many small pipeline chunks cost more than a few large ones.
    """

    name: str
    gpus_per_node: int
    intra_node_latency: float
    intra_node_bandwidth: float
    inter_node_latency: float
    inter_node_bandwidth: float
    gemm_throughput: Mapping[str, float] = field(default_factory=dict)
    memory_bandwidth: float = 1e12
    op_overhead: float = 1e-5

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        check_int("gpus_per_node", self.gpus_per_node, 1)
        for name in (
            "intra_node_latency",
            "intra_node_bandwidth",
            "inter_node_latency",
            "inter_node_bandwidth",
            "memory_bandwidth",
            "op_overhead",
        ):
            _check_positive(name, getattr(self, name))
        if not isinstance(self.gemm_throughput, Mapping) or not self.gemm_throughput:
            raise ValueError("gemm_throughput must be a non-empty mapping of dtype name -> FLOP/s")
        for dtype, flops in self.gemm_throughput.items():
            _check_dtype("gemm_throughput key", dtype)
            _check_positive(f"gemm_throughput[{dtype!r}]", flops)

    def throughput(self, dtype: str) -> float:
        """Achieved GEMM FLOP/s for ``dtype``; ValueError naming the dtypes this cluster knows."""
        if dtype not in self.gemm_throughput:
            raise ValueError(
                f"dtype {dtype!r} has no GEMM throughput in cluster {self.name!r}; "
                f"it knows {tuple(self.gemm_throughput)} (add it to gemm_throughput)"
            )
        return self.gemm_throughput[dtype]

    def replace(self, **changes: Any) -> ClusterConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["gemm_throughput"] = dict(self.gemm_throughput)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClusterConfig:
        return cls(**data)


# Published clusters. Bandwidths are what a device achieves, below the links' peak:
# A100 (8 per node with HDR InfiniBand, the Tutel paper's setting): NVLink 3 (600 GB/s both ways per GPU),
# one 200 Gb/s HDR InfiniBand NIC per GPU (25 GB/s); 312 TFLOP/s bf16 peak, ~60% achieved on
# expert-sized GEMMs; HBM2e 2 TB/s.
# H100 (DGX H100 class): NVLink 4 (900 GB/s both ways), one 400 Gb/s NDR NIC per GPU (50 GB/s);
# 989 TFLOP/s bf16 dense peak; HBM3 3.35 TB/s.
# Latencies: a NCCL peer message costs a few microseconds inside a node and more across the
# fabric (NIC, switch hops, the proxy thread).
PRESETS: dict[str, ClusterConfig] = {
    "a100-hdr": ClusterConfig(
        name="a100-hdr",
        gpus_per_node=8,
        intra_node_latency=3e-6,
        intra_node_bandwidth=200e9,
        inter_node_latency=8e-6,
        inter_node_bandwidth=22e9,
        gemm_throughput={"bfloat16": 190e12, "float16": 190e12, "float32": 95e12},
        memory_bandwidth=1.5e12,
        op_overhead=1e-5,
    ),
    "h100-ndr": ClusterConfig(
        name="h100-ndr",
        gpus_per_node=8,
        intra_node_latency=3e-6,
        intra_node_bandwidth=350e9,
        inter_node_latency=7e-6,
        inter_node_bandwidth=45e9,
        gemm_throughput={"bfloat16": 600e12, "float16": 600e12, "float32": 300e12},
        memory_bandwidth=2.6e12,
        op_overhead=8e-6,
    ),
}


def preset(name: str) -> ClusterConfig:
    """The preset cluster ``name``; ValueError naming the presets."""
    if name not in PRESETS:
        raise ValueError(f"cluster preset must be one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]


def skewed_load(num_experts: int, skew: float) -> tuple[float, ...]:
    """Fractions of the routed rows per expert: expert 0 gets ``skew`` times the mean, the rest share
    what is left evenly. skew 1 is uniform; skew E puts every row on expert 0."""
    check_int("num_experts", num_experts, 1)
    _check_positive("skew", skew)
    if skew < 1 or skew > num_experts:
        raise ValueError(f"skew must be in 1..num_experts = 1..{num_experts} (1 = uniform), got {skew!r}")
    if num_experts == 1:
        return (1.0,)
    hot = skew / num_experts
    rest = (1.0 - hot) / (num_experts - 1)
    return (hot,) + (rest,) * (num_experts - 1)


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer call, as seen by every rank (each rank routes the same way).

    model_dim, hidden_dim: M and H of each expert FFN (``gated``: three matrices, else two).
    num_experts: E; top_k: k; tokens_per_rank: T.
    capacity_factor: f of ``capacity = k * ceil(f * T / E)`` (the padded buffer's slots per
        expert); 0 = dropless (capacity = the largest load of any expert).
    expert_load: fraction of the routed rows going to each expert (length E, sums to 1);
        None = uniform. :func:`skewed_load` builds one; a trace is a sequence of them.
    dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (activations and weights).
    """

    model_dim: int
    hidden_dim: int
    num_experts: int
    top_k: int
    tokens_per_rank: int
    capacity_factor: float = 1.0
    expert_load: tuple[float, ...] | None = None
    dtype: str = "bfloat16"
    gated: bool = False

    def __post_init__(self) -> None:
        for name in ("model_dim", "hidden_dim", "num_experts", "top_k", "tokens_per_rank"):
            check_int(name, getattr(self, name), 1)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts ({self.num_experts}), got {self.top_k}")
        factor = self.capacity_factor
        limit = CAPACITY_FACTOR_LIMIT * self.num_experts  # as the layer accepts
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor <= limit:
            raise ValueError(
                f"capacity_factor must be a number in 0..{limit} ({CAPACITY_FACTOR_LIMIT} x num_experts; 0 = "
                f"dropless, at num_experts every token fits), got {factor!r}"
            )
        _check_dtype("dtype", self.dtype)
        if not isinstance(self.gated, bool):
            raise TypeError(f"gated must be a bool, got {type(self.gated).__name__}")
        if self.expert_load is not None:
            load = self.expert_load
            if not isinstance(load, Sequence) or len(load) != self.num_experts:
                raise ValueError(f"expert_load must be a sequence of num_experts ({self.num_experts}) fractions")
            if any(not isinstance(v, (int, float)) or v < 0 for v in load) or abs(sum(load) - 1) > 1e-6:
                raise ValueError("expert_load must hold fractions >= 0 that sum to 1 (None = uniform)")
            object.__setattr__(self, "expert_load", tuple(float(v) for v in load))

    @property
    def element_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def matrices(self) -> int:
        """Weight matrices per expert FFN (M x H each)."""
        return 3 if self.gated else 2

    def replace(self, **changes: Any) -> LayerShape:
        return dataclasses.replace(self, **changes)

    def rows_per_expert(self) -> tuple[float, ...]:
        """Rows one rank routes to each expert before the capacity cut: ``T * k * load``."""
        routed = self.tokens_per_rank * self.top_k
        load = self.expert_load or (1.0 / self.num_experts,) * self.num_experts
        return tuple(routed * fraction for fraction in load)

    def capacity(self) -> int:
        """Slots per expert of the padded buffer (the same on every rank)."""
        if self.capacity_factor == 0:
            return math.ceil(max(self.rows_per_expert()))
        return self.top_k * math.ceil(self.capacity_factor * self.tokens_per_rank / self.num_experts)
