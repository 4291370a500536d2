"""Alpha-beta cost model of one MoE layer call, forward + backward, for one choice.

A choice is (parallel degree r, pipelining degree d, all-to-all algorithm, exact or padded
rows), as the executor in :mod:`flexmoe.parallel.expert_parallel` runs it. Every term is a
message count times a latency (alpha), bytes over a bandwidth (beta), FLOPs over an achieved
throughput, or bytes over the memory bandwidth; the pipeline of d chunks is simulated in the
executor's issue order. docs/planner.md writes the model down term by term.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from flexmoe.parallel.config import check_a2a_algorithm, check_int, check_overlap_degree
from flexmoe.planner.config import ClusterConfig, LayerShape

TokenRows = Literal["exact", "padded"]
TOKEN_ROWS: tuple[str, ...] = ("exact", "padded")
# Operations of the layer outside the expert step (router GEMM, softmax, top-k, index bookkeeping,
# dispatch and combine launches), forward + backward: a fixed count of op_overhead each.
LAYER_OPS = 30
COUNT_BYTES = 8  # one int64 per expert in the count exchange of the exact path


@dataclass(frozen=True, order=True)
class PlanChoice:
    """One way to run the expert step: r, d, the all-to-all algorithm, exact or padded rows.

    token_rows: ``"exact"`` exchanges and computes exactly the routed rows (a count exchange
    first); ``"padded"`` every expert's rows padded to the agreed capacity.
    """

    parallel_degree: int
    overlap_degree: int = 1
    a2a_algorithm: str = "linear"
    token_rows: str = "padded"

    def __post_init__(self) -> None:
        check_int("parallel_degree", self.parallel_degree, 0)
        check_overlap_degree(self.overlap_degree)
        check_a2a_algorithm(self.a2a_algorithm)
        if self.token_rows not in TOKEN_ROWS:
            raise ValueError(f"token_rows must be one of {TOKEN_ROWS}, got {self.token_rows!r}")

    @property
    def label(self) -> str:
        return f"r={self.parallel_degree} d={self.overlap_degree} {self.a2a_algorithm} {self.token_rows}"


@dataclass(frozen=True)
class Workload:
    """The rows of one step: ``rows[source][expert]`` kept rows each rank sends each expert
    (one row: every rank alike), and the capacity the ranks agreed (the padded path's slots)."""

    world_size: int
    capacity: int
    rows: tuple[tuple[float, ...], ...]

    @classmethod
    def from_shape(cls, shape: LayerShape, world_size: int) -> Workload:
        """Every rank routes like ``shape`` (its expert_load); rows past the capacity are dropped."""
        capacity = shape.capacity()
        kept = tuple(min(rows, capacity) for rows in shape.rows_per_expert())
        return cls(world_size, capacity, (kept,))

    @property
    def num_experts(self) -> int:
        return len(self.rows[0])

    def sources(self) -> list[tuple[tuple[float, ...], int]]:
        """(rows of a source rank, how many ranks send like it)."""
        if len(self.rows) == 1:
            return [(self.rows[0], self.world_size)]
        return [(row, 1) for row in self.rows]

    def max_own_rows(self) -> float:
        return max(sum(row) for row, _ in self.sources())

    def max_received_rows(self, parallel_degree: int) -> float:
        """Largest rows any rank receives at degree r >= 1 (the all-to-all waits for it).

        E >= W: rank j receives its experts' rows from every rank. E < W: the rank at position p
        of a gather block receives its expert's rows from the ranks at position p of theirs."""
        experts, world = self.num_experts, self.world_size
        if experts >= world:
            local = experts // world
            return max(
                sum(sum(row[j * local : (j + 1) * local]) * count for row, count in self.sources())
                for j in range(world)
            )
        block = world // experts // parallel_degree
        if len(self.rows) == 1:
            return world // block * max(self.rows[0])
        return max(
            sum(self.rows[src][e] for src in range(position, world, block))
            for e in range(experts)
            for position in range(block)
        )


@dataclass(frozen=True)
class Prediction:
    """Predicted seconds of one choice, forward + backward, and where they go (before overlap).

    seconds: the total after overlap. gemm / exchange / weights / local: the expert GEMMs, the
    token all-to-alls (incl. the count exchange), the weight gathers and gradient reductions,
    the local copies and per-operation overheads. outside_step: the part of ``local`` outside
    the expert step (router, dispatch, combine).
    """

    choice: PlanChoice
    seconds: float
    gemm: float
    exchange: float
    weights: float
    local: float
    outside_step: float

    @property
    def expert_step(self) -> float:
        """Seconds of the expert step alone (all-to-all, experts, all-to-all), what a tuner times."""
        return self.seconds - self.outside_step


# --- collectives in alpha-beta terms -----------------------------------------------------------------


def _members_per_node(cluster: ClusterConfig, group_size: int, stride: int) -> int:
    """Members of a group of ranks ``stride`` apart that share a node."""
    return max(1, min(group_size, cluster.gpus_per_node // stride))


def linear_all_to_all(cluster: ClusterConfig, group_size: int, nbytes: float, stride: int = 1) -> float:
    """One all_to_all_single over ``group_size`` ranks ``stride`` apart; ``nbytes``: the most any rank
    sends or receives. One message per peer (latency adds up), each ``nbytes / group_size``."""
    if group_size == 1:
        return cluster.op_overhead
    local = _members_per_node(cluster, group_size, stride)
    remote = group_size - local
    latency = (local - 1) * cluster.intra_node_latency + remote * cluster.inter_node_latency
    transfer = max(
        nbytes * (local - 1) / group_size / cluster.intra_node_bandwidth,
        nbytes * remote / group_size / cluster.inter_node_bandwidth,
    )
    return cluster.op_overhead + latency + transfer


def two_dh_all_to_all(cluster: ClusterConfig, world_size: int, nbytes: float) -> tuple[float, float]:
    """2D-hierarchical all-to-all over the world: (intra-node stage, inter-node stage) seconds.

    Each stage regroups its send buffer (a copy) then exchanges: first among the node's ranks,
    then among the ranks of the same local rank, one per node, with node-sized messages."""
    local = cluster.gpus_per_node
    nodes = world_size // local
    regroup = 2 * nbytes / cluster.memory_bandwidth
    intra = (local - 1) * (cluster.intra_node_latency + nbytes / local / cluster.intra_node_bandwidth)
    inter = (nodes - 1) * (cluster.inter_node_latency + nbytes / nodes / cluster.inter_node_bandwidth)
    return regroup + intra + cluster.op_overhead, regroup + inter + cluster.op_overhead


def _ring(cluster: ClusterConfig, group_size: int, nbytes: float, stride: int = 1) -> float:
    """One ring pass (all-gather, or half an all-reduce) of ``nbytes`` over ``group_size`` ranks."""
    if group_size == 1:
        return 0.0
    spans_nodes = _members_per_node(cluster, group_size, stride) < group_size
    latency = cluster.inter_node_latency if spans_nodes else cluster.intra_node_latency
    bandwidth = cluster.inter_node_bandwidth if spans_nodes else cluster.intra_node_bandwidth
    return cluster.op_overhead + (group_size - 1) * (latency + nbytes / group_size / bandwidth)


def all_gather(cluster: ClusterConfig, group_size: int, nbytes: float) -> float:
    """Ring all-gather producing ``nbytes`` on every rank."""
    return _ring(cluster, group_size, nbytes)


def all_reduce(cluster: ClusterConfig, group_size: int, nbytes: float) -> float:
    """Ring all-reduce of ``nbytes`` (reduce-scatter + all-gather)."""
    return 2 * _ring(cluster, group_size, nbytes)


# --- the pipeline of d chunks ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Exchange:
    """One chunk's exchange: the part that runs in the background and the part the host waits
    through (2dh's inter-node stage runs when the exchange is awaited)."""

    background: float
    blocking: float = 0.0


class _Timeline:
    """A network that runs background exchanges in issue order, and a host that computes."""

    def __init__(self) -> None:
        self.host = 0.0
        self.network = 0.0

    def issue(self, exchange: _Exchange) -> float:
        """Start ``exchange`` now (queued behind earlier ones); returns when its background part ends."""
        self.network = max(self.network, self.host) + exchange.background
        return self.network

    def wait(self, done: float, exchange: _Exchange) -> None:
        self.host = max(self.host, done)
        if exchange.blocking:
            self.host = self.network = max(self.host, self.network) + exchange.blocking

    def compute(self, seconds: float) -> None:
        self.host += seconds


def pipeline_forward(chunks: int, there: _Exchange, compute: float, back: _Exchange) -> float:
    """Seconds of the forward pipeline, in the executor's order: chunk i+1's exchange is issued
    before chunk i computes, chunk i's return exchange right after it computes."""
    line = _Timeline()
    arrivals = [line.issue(there)]
    returns = []
    for i in range(chunks):
        if i + 1 < chunks:
            arrivals.append(line.issue(there))
        line.wait(arrivals[i], there)
        line.compute(compute)
        returns.append(line.issue(back))
    for done in returns:
        line.wait(done, back)
    return line.host


def pipeline_backward(chunks: int, there: _Exchange, compute: float, back: _Exchange) -> float:
    """Seconds of the backward pipeline (autograd's reverse order): every return exchange's
    gradient is issued first; chunk by chunk in reverse, its gradient is awaited, the chunk's
    backward computes, and its gradient is sent back."""
    line = _Timeline()
    arrivals = [line.issue(back) for _ in range(chunks)]
    sent = []
    for i in range(chunks):
        line.wait(arrivals[i], back)
        line.compute(compute)
        sent.append(line.issue(there))
    for done in sent:
        line.wait(done, there)
    return line.host


# --- the layer call ----------------------------------------------------------------------------------


def gemm_seconds(cluster: ClusterConfig, shape: LayerShape, rows: float, hidden_width: float) -> float:
    """Forward expert FFN of ``rows`` rows at hidden width ``hidden_width``: FLOPs over throughput."""
    flops = 2.0 * rows * shape.model_dim * hidden_width * shape.matrices
    return flops / cluster.throughput(shape.dtype)


def predict(
    shape: LayerShape,
    cluster: ClusterConfig,
    world_size: int,
    choice: PlanChoice,
    workload: Workload | None = None,
) -> Prediction:
    """Predicted forward + backward seconds of one layer call at ``choice``.

    workload: the step's rows (default: every rank routes like ``shape``). The choice must be
    valid for the layout (:func:`flexmoe.planner.plan.valid_plan_choices`)."""
    workload = workload or Workload.from_shape(shape, world_size)
    experts, world, degree = shape.num_experts, world_size, choice.parallel_degree
    shards = max(1, world // experts)
    local_experts = max(1, experts // world)
    exact = choice.token_rows == "exact"
    row_bytes = shape.model_dim * shape.element_bytes
    expert_bytes = shape.matrices * shape.model_dim * shape.hidden_dim * shape.element_bytes
    op = cluster.op_overhead
    copy = 2.0 / cluster.memory_bandwidth  # seconds per byte copied (read + write)

    # Dispatch and combine, forward and backward: the routed rows (exact) or the whole buffer.
    buffer_rows = workload.max_own_rows() if exact else experts * workload.capacity
    local = 4 * buffer_rows * row_bytes * copy + LAYER_OPS * op

    if degree == 0:  # every rank gathers every expert and computes its own rows
        weights_bytes = experts * expert_bytes
        weights = all_gather(cluster, world, weights_bytes) + all_reduce(cluster, world, weights_bytes)
        gemm = 3 * gemm_seconds(cluster, shape, buffer_rows, shape.hidden_dim)
        launches = 3 * shape.matrices * op
        return Prediction(choice, gemm + weights + local + launches, gemm, 0.0, weights, local + launches, local)

    block = shards // degree  # ranks whose slices make up one hidden slice at degree r
    group = world // block  # ranks in one all-to-all
    hidden_width = shape.hidden_dim / degree
    sent_rows = degree * (workload.max_own_rows() if exact else experts * workload.capacity)
    received_rows = workload.max_received_rows(degree) if exact else group * local_experts * workload.capacity
    chunks = choice.overlap_degree
    chunk_bytes = max(sent_rows, received_rows) * row_bytes / chunks

    def exchange_of(nbytes: float) -> _Exchange:
        if choice.a2a_algorithm == "2dh":
            return _Exchange(*two_dh_all_to_all(cluster, world, nbytes))
        return _Exchange(linear_all_to_all(cluster, group, nbytes, stride=block))

    exchange = exchange_of(chunk_bytes)
    # Per chunk: the GEMMs, the flexible-layout regroup there and back, the partial sums (r > 1).
    regroup = 2 * received_rows / chunks * row_bytes * copy
    partial_sums = (sent_rows / chunks * row_bytes * copy) if degree > 1 else 0.0
    chunk_forward = gemm_seconds(cluster, shape, received_rows / chunks, hidden_width)
    chunk_local = regroup + partial_sums + (shape.matrices + 3) * op
    forward = pipeline_forward(chunks, exchange, chunk_forward + chunk_local, exchange)
    backward = pipeline_backward(chunks, exchange, 2 * chunk_forward + chunk_local, exchange)

    weights = 0.0
    if block > 1:  # gather this rank's hidden slice from its block; reduce its gradient back
        slice_bytes = local_experts * expert_bytes / degree
        weights = all_gather(cluster, block, slice_bytes) + all_reduce(cluster, block, slice_bytes)
    # The exact path first exchanges per-expert counts (same group and algorithm): latency only.
    counts = exchange_of(experts * COUNT_BYTES)
    count_exchange = counts.background + counts.blocking if exact else 0.0
    gemm = 3 * chunks * chunk_forward
    exchange_total = 4 * chunks * (exchange.background + exchange.blocking) + count_exchange
    total = forward + backward + weights + count_exchange + local
    return Prediction(choice, total, gemm, exchange_total, weights, local + 2 * chunks * chunk_local, local)


def predict_all(
    shape: LayerShape,
    cluster: ClusterConfig,
    world_size: int,
    choices: Sequence[PlanChoice],
    workload: Workload | None = None,
) -> list[Prediction]:
    """:func:`predict` for each choice, fastest first (ties: the smaller choice)."""
    workload = workload or Workload.from_shape(shape, world_size)
    predictions = [predict(shape, cluster, world_size, choice, workload) for choice in choices]
    return sorted(predictions, key=lambda p: (p.seconds, p.choice))
