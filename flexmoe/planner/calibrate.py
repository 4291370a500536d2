"""Fit the planner's machine constants to measured layer calls, and check its predictions.

A measurement record (one JSON object; ``benchmarks/planner_records.py`` writes a document of
them) holds one choice's measured forward + backward seconds on one step::

    {"world_size": 2, "local_world_size": 2, "num_experts": 4, "model_dim": 128, "hidden_dim": 512,
     "top_k": 2, "dtype": "float32", "tokens_per_rank": 512, "step": 0,
     "capacity": 574,                       # the capacity the ranks agreed (padded slots)
     "rows": [[300, 266, 246, 212], ...],   # [world][experts] rows each rank kept per expert
     "choice": {"parallel_degree": 1, "overlap_degree": 2, "a2a_algorithm": "linear",
                "token_rows": "padded"},    # or "exact"
     "seconds": 0.061}

The fit searches the constants that minimise the squared log ratio of predicted to measured
time over all records (Nelder-Mead in log space: the model is a max-plus function of them, not
linear). Latency and bandwidth are one pair (intra- = inter-node): on one machine every rank
talks over loopback.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexmoe.files import read_json_document
from flexmoe.planner.config import ClusterConfig, LayerShape
from flexmoe.planner.model import PlanChoice, Workload, predict

RECORDS_FORMAT = "flexmoe-planner-records"

# A starting point for a CPU with gloo on loopback (the fit moves every constant from here).
LOOPBACK_START = ClusterConfig(
    name="gloo-loopback",
    gpus_per_node=2,
    intra_node_latency=5e-5,
    intra_node_bandwidth=2e9,
    inter_node_latency=5e-5,
    inter_node_bandwidth=2e9,
    gemm_throughput={"float32": 5e10},
    memory_bandwidth=5e9,
    op_overhead=2e-5,
)


@dataclass(frozen=True)
class Measurement:
    """One record: what ran (shape, world, rows, choice) and how long it took (slowest rank)."""

    shape: LayerShape
    world_size: int
    local_world_size: int
    workload: Workload
    choice: PlanChoice
    seconds: float
    step: int

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Measurement:
        shape = LayerShape(
            model_dim=record["model_dim"],
            hidden_dim=record["hidden_dim"],
            num_experts=record["num_experts"],
            top_k=record["top_k"],
            tokens_per_rank=record["tokens_per_rank"],
            dtype=record["dtype"],
            gated=record.get("gated", False),
        )
        rows = tuple(tuple(float(v) for v in row) for row in record["rows"])
        world = record["world_size"]
        if len(rows) != world or any(len(row) != shape.num_experts for row in rows):
            raise ValueError(f"rows must be [world_size={world}][num_experts={shape.num_experts}]")
        seconds = float(record["seconds"])
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        return cls(
            shape=shape,
            world_size=world,
            local_world_size=record.get("local_world_size", world),
            workload=Workload(world, int(record["capacity"]), rows),
            choice=PlanChoice(**record["choice"]),
            seconds=seconds,
            step=int(record.get("step", 0)),
        )

    @property
    def config_label(self) -> str:
        """The layer configuration the record belongs to (one validation table each)."""
        s = self.shape
        return (
            f"E={s.num_experts} on world {self.world_size} ({self.local_world_size} per node) "
            f"M={s.model_dim} H={s.hidden_dim} k={s.top_k} T={s.tokens_per_rank}"
        )


def load_measurements(path: str | Path) -> list[Measurement]:
    """The records of a JSON document (``format: flexmoe-planner-records``); ValueError naming the file."""
    document = read_json_document(Path(path), RECORDS_FORMAT, "planner measurement records")
    try:
        return [Measurement.from_json(record) for record in document["records"]]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: malformed measurement record ({error})") from None


def predicted_seconds(cluster: ClusterConfig, measurement: Measurement) -> float:
    """The model's time for a measured call (the cluster's node size set to the run's)."""
    cluster = cluster.replace(gpus_per_node=measurement.local_world_size)
    return predict(measurement.shape, cluster, measurement.world_size, measurement.choice, measurement.workload).seconds


# --- the fit ------------------------------------------------------------------------------------------


# How far (a factor, either way) a fitted constant may move from its start: keeps a constant the
# records barely constrain (memory bandwidth when copies are a sliver of the time) physical.
FIT_RANGE = 1e3


def _cluster_from(values: Sequence[float], start: ClusterConfig, dtype: str) -> ClusterConfig:
    latency, bandwidth, throughput, memory, overhead = (math.exp(v) for v in values)
    return start.replace(
        name=f"{start.name} (fitted)",
        intra_node_latency=latency,
        inter_node_latency=latency,
        intra_node_bandwidth=bandwidth,
        inter_node_bandwidth=bandwidth,
        gemm_throughput={**start.gemm_throughput, dtype: throughput},
        memory_bandwidth=memory,
        op_overhead=overhead,
    )


def nelder_mead(
    loss: Callable[[list[float]], float], start: Sequence[float], step: float = 1.0, iterations: int = 600
) -> list[float]:
    """Minimise ``loss`` from ``start`` (simplex of side ``step``); the best point found."""
    simplex = [list(start)] + [[v + (step if i == j else 0.0) for j, v in enumerate(start)] for i in range(len(start))]
    scores = [loss(point) for point in simplex]
    for _ in range(iterations):
        order = sorted(range(len(simplex)), key=scores.__getitem__)
        simplex, scores = [simplex[i] for i in order], [scores[i] for i in order]
        centroid = [sum(p[j] for p in simplex[:-1]) / (len(simplex) - 1) for j in range(len(start))]
        worst = simplex[-1]

        def toward(t: float, centroid: list[float] = centroid, worst: list[float] = worst) -> list[float]:
            return [c + t * (w - c) for c, w in zip(centroid, worst)]

        reflected = toward(-1.0)
        reflected_score = loss(reflected)
        if reflected_score < scores[0]:
            expanded = toward(-2.0)
            expanded_score = loss(expanded)
            simplex[-1], scores[-1] = (
                (expanded, expanded_score) if expanded_score < reflected_score else (reflected, reflected_score)
            )
        elif reflected_score < scores[-2]:
            simplex[-1], scores[-1] = reflected, reflected_score
        else:
            contracted = toward(0.5)
            contracted_score = loss(contracted)
            if contracted_score < scores[-1]:
                simplex[-1], scores[-1] = contracted, contracted_score
            else:  # shrink toward the best point
                for i in range(1, len(simplex)):
                    simplex[i] = [b + 0.5 * (v - b) for b, v in zip(simplex[0], simplex[i])]
                    scores[i] = loss(simplex[i])
    return simplex[min(range(len(simplex)), key=scores.__getitem__)]


def fit_cluster(
    measurements: Sequence[Measurement], start: ClusterConfig = LOOPBACK_START, iterations: int = 600
) -> ClusterConfig:
    """The constants (latency, bandwidth, GEMM throughput of the records' dtype, memory bandwidth,
    per-op overhead) that best predict ``measurements``, starting from ``start`` (``iterations``
    Nelder-Mead steps per restart)."""
    if not measurements:
        raise ValueError("measurements must not be empty: nothing to fit")
    dtypes = {m.shape.dtype for m in measurements}
    if len(dtypes) != 1:
        raise ValueError(f"measurements must share one dtype to fit one GEMM throughput, got {sorted(dtypes)}")
    dtype = dtypes.pop()
    start = start.replace(gemm_throughput={**start.gemm_throughput, dtype: start.gemm_throughput.get(dtype, 5e10)})

    def loss(values: list[float]) -> float:
        values = [min(max(v, low), high) for v, low, high in zip(values, lower, upper)]
        cluster = _cluster_from(values, start, dtype)
        return sum(math.log(predicted_seconds(cluster, m) / m.seconds) ** 2 for m in measurements)

    initial = [
        math.log(v)
        for v in (
            start.intra_node_latency,
            start.intra_node_bandwidth,
            start.gemm_throughput[dtype],
            start.memory_bandwidth,
            start.op_overhead,
        )
    ]
    lower = [v - math.log(FIT_RANGE) for v in initial]
    upper = [v + math.log(FIT_RANGE) for v in initial]
    best = initial
    for _ in range(3):  # restarts: Nelder-Mead stalls on the max() kinks of the pipeline
        best = [
            min(max(v, low), high) for v, low, high in zip(nelder_mead(loss, best, iterations=iterations), lower, upper)
        ]
    return _cluster_from(best, start, dtype)


# --- validation -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceRow:
    """One choice of one configuration: predicted and measured seconds summed over the steps."""

    choice: PlanChoice
    predicted: float
    measured: float

    @property
    def error(self) -> float:
        """predicted / measured - 1."""
        return self.predicted / self.measured - 1


@dataclass(frozen=True)
class Validation:
    """Per configuration: the choice rows, and per step whether the predicted best is the measured best,
    what the predicted best costs over the measured best (the price of a wrong pick), and the
    measured second best over the best (how close a call the step was)."""

    config: str
    rows: tuple[ChoiceRow, ...]
    same_best: tuple[bool, ...]
    regret: tuple[float, ...]
    runner_up: tuple[float, ...]


def validate(measurements: Sequence[Measurement], cluster: ClusterConfig) -> list[Validation]:
    """Predicted vs measured per choice and per step, one :class:`Validation` per configuration."""
    by_config: dict[str, list[Measurement]] = defaultdict(list)
    for m in measurements:
        by_config[m.config_label].append(m)
    results = []
    for config, group in by_config.items():
        sums: dict[PlanChoice, list[float]] = defaultdict(lambda: [0.0, 0.0])
        steps: dict[int, list[tuple[Measurement, float]]] = defaultdict(list)
        for m in group:
            predicted = predicted_seconds(cluster, m)
            sums[m.choice][0] += predicted
            sums[m.choice][1] += m.seconds
            steps[m.step].append((m, predicted))
        same, regret, runner_up = [], [], []
        for step in sorted(steps):
            entries = steps[step]
            measured = sorted(m.seconds for m, _ in entries)
            runner_up.append(measured[1] / measured[0] if len(measured) > 1 else 1.0)
            predicted_best = min(entries, key=lambda e: (e[1], e[0].choice))[0]
            measured_best = min(entries, key=lambda e: (e[0].seconds, e[0].choice))[0]
            same.append(predicted_best.choice == measured_best.choice)
            regret.append(predicted_best.seconds / measured_best.seconds)
        rows = tuple(ChoiceRow(choice, p, s) for choice, (p, s) in sorted(sums.items()))
        results.append(Validation(config, rows, tuple(same), tuple(regret), tuple(runner_up)))
    return results


def format_validation(validations: Sequence[Validation], cluster: ClusterConfig) -> str:
    """The validation tables and the fitted constants, as text."""
    gemm = ", ".join(f"{dtype} {flops / 1e9:.1f} GFLOP/s" for dtype, flops in cluster.gemm_throughput.items())
    lines = [
        f"constants ({cluster.name}): latency {cluster.intra_node_latency * 1e6:.1f} us, "
        f"bandwidth {cluster.intra_node_bandwidth / 1e9:.2f} GB/s, GEMM {gemm}, "
        f"memory {cluster.memory_bandwidth / 1e9:.2f} GB/s, per-op overhead {cluster.op_overhead * 1e6:.1f} us"
    ]
    for v in validations:
        lines += ["", v.config, f"{'choice (r d a2a rows)':<28} {'predicted ms':>13} {'measured ms':>12} {'error':>7}"]
        for row in v.rows:
            lines.append(
                f"{row.choice.label:<28} {row.predicted * 1e3:>13.2f} {row.measured * 1e3:>12.2f} {row.error:>+7.0%}"
            )
        within = sum(abs(row.error) <= 0.25 for row in v.rows)
        mean_regret = sum(v.regret) / len(v.regret)
        lines.append(
            f"within 25%: {within}/{len(v.rows)} choices; predicted best = measured best on "
            f"{sum(v.same_best)}/{len(v.same_best)} steps; measured time of the predicted best over the "
            f"measured best: mean {mean_regret:.2f}x, worst {max(v.regret):.2f}x; measured second best over "
            f"the best: median {statistics.median(v.runner_up):.2f}x"
        )
    return "\n".join(lines)
