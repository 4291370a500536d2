"""Every valid choice of a layer on a cluster, its predicted time, the best; sweeps over world sizes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flexmoe.parallel.config import OVERLAP_CANDIDATES, check_int
from flexmoe.parallel.layout import ExpertLayout
from flexmoe.planner.config import ClusterConfig, LayerShape
from flexmoe.planner.model import TOKEN_ROWS, PlanChoice, Prediction, Workload, predict_all

SWEEP_WORLD_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)


def supports_2dh(cluster: ClusterConfig, world_size: int) -> bool:
    """2dh needs at least two nodes of at least two ranks, all full."""
    local = cluster.gpus_per_node
    return 1 < local < world_size and world_size % local == 0


def valid_plan_choices(
    shape: LayerShape,
    cluster: ClusterConfig,
    world_size: int,
    overlap_degrees: Sequence[int] = OVERLAP_CANDIDATES,
    token_rows: Sequence[str] = TOKEN_ROWS,
) -> list[PlanChoice]:
    """The choices the executor offers for this layout (as ``flexmoe.parallel.valid_choices``), each
    with exact and padded rows: r in {0} and the divisors of S; for r >= 1 every d and linear, and
    2dh where the whole world exchanges (r = S) across at least two nodes."""
    check_int("world_size", world_size, 1)
    layout = ExpertLayout(shape.num_experts, world_size)
    layout.local_hidden_dim(shape.hidden_dim)  # raises unless S divides hidden_dim
    for d in overlap_degrees:
        check_int("overlap_degree", d, 1)
    choices = []
    for rows in token_rows:
        for degree in layout.valid_degrees():
            if degree == 0:  # no token exchange: d and the algorithm play no part
                choices.append(PlanChoice(0, 1, "linear", rows))
                continue
            algorithms = ["linear"]
            if degree == layout.shards_per_expert and supports_2dh(cluster, world_size):
                algorithms.append("2dh")
            choices += [PlanChoice(degree, d, a, rows) for d in overlap_degrees for a in algorithms]
    return sorted(choices)


@dataclass(frozen=True)
class Plan:
    """Predictions for every valid choice of one layer call, fastest first."""

    shape: LayerShape
    cluster: ClusterConfig
    world_size: int
    predictions: tuple[Prediction, ...]

    @property
    def best(self) -> Prediction:
        return self.predictions[0]

    def seconds(self, choice: PlanChoice) -> float:
        for prediction in self.predictions:
            if prediction.choice == choice:
                return prediction.seconds
        raise ValueError(f"{choice} is not a valid choice of this plan")

    def fastest(self, **fields: object) -> Prediction:
        """The fastest prediction whose choice has the given field values (e.g. ``token_rows="padded"``)."""
        matching = [p for p in self.predictions if all(getattr(p.choice, k) == v for k, v in fields.items())]
        if not matching:
            raise ValueError(f"no valid choice has {fields}")
        return matching[0]


def make_plan(
    shape: LayerShape,
    cluster: ClusterConfig,
    world_size: int,
    overlap_degrees: Sequence[int] = OVERLAP_CANDIDATES,
    workload: Workload | None = None,
) -> Plan:
    """Predict every valid choice of ``shape`` on ``world_size`` ranks of ``cluster``."""
    choices = valid_plan_choices(shape, cluster, world_size, overlap_degrees)
    return Plan(shape, cluster, world_size, tuple(predict_all(shape, cluster, world_size, choices, workload)))


def sweep(
    shape: LayerShape,
    cluster: ClusterConfig,
    world_sizes: Sequence[int] = SWEEP_WORLD_SIZES,
    overlap_degrees: Sequence[int] = OVERLAP_CANDIDATES,
) -> list[Plan]:
    """One :class:`Plan` per world size (tokens per rank fixed: the global batch grows with W)."""
    return [make_plan(shape, cluster, world, overlap_degrees) for world in world_sizes]


def format_plan(plan: Plan, limit: int | None = None) -> str:
    """The plan as a text table: one row per choice, fastest first, with its breakdown."""
    shape, best = plan.shape, plan.best.seconds
    lines = [
        f"{plan.cluster.name}: world {plan.world_size} ({plan.cluster.gpus_per_node} per node); "
        f"E={shape.num_experts} M={shape.model_dim} H={shape.hidden_dim} k={shape.top_k} "
        f"T={shape.tokens_per_rank}/rank f={shape.capacity_factor} {shape.dtype}; "
        f"capacity {shape.capacity()}, S={max(1, plan.world_size // shape.num_experts)}",
        f"{'choice (r d a2a rows)':<28} {'ms':>9} {'x best':>7} {'gemm':>8} {'a2a':>8} {'weights':>8} {'local':>8}",
    ]
    for prediction in plan.predictions[:limit]:
        lines.append(
            f"{prediction.choice.label:<28} {prediction.seconds * 1e3:>9.3f} {prediction.seconds / best:>7.2f} "
            + " ".join(
                f"{v * 1e3:>8.3f}" for v in (prediction.gemm, prediction.exchange, prediction.weights, prediction.local)
            )
        )
    lines.append(f"best: {plan.best.choice.label} ({best * 1e3:.3f} ms forward + backward)")
    return "\n".join(lines)


def _families(choice: PlanChoice, world_size: int, num_experts: int) -> list[str]:
    """A choice's lines in the sweep plot: r as 0, 1, S or a hybrid (both 1 and S when S = 1, where
    they coincide); the algorithm; the rows."""
    shards = max(1, world_size // num_experts)
    degree = choice.parallel_degree
    names = ["0"] if degree == 0 else [n for n, r in (("1", 1), ("S", shards)) if r == degree] or ["hybrid"]
    return [f"r={name} {choice.a2a_algorithm} {choice.token_rows}" for name in names]


def plot_sweep(plans: Sequence[Plan], path: str | Path) -> Path:
    """Predicted time per choice family (best d of each) over the world sizes, as a PNG.

    Needs matplotlib (``pip install flexmoe[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--sweep plots need matplotlib: pip install 'flexmoe[plot]'") from None
    worlds = [plan.world_size for plan in plans]
    families: dict[str, dict[int, float]] = {}
    for plan in plans:
        for prediction in plan.predictions:
            for name in _families(prediction.choice, plan.world_size, plan.shape.num_experts):
                family = families.setdefault(name, {})
                family[plan.world_size] = min(family.get(plan.world_size, float("inf")), prediction.seconds)
    figure, axis = plt.subplots(figsize=(9, 5.5))
    colors = {"r=0": "tab:blue", "r=1": "tab:orange", "r=S": "tab:green", "r=hybrid": "tab:purple"}
    for name, times in sorted(families.items()):
        xs = [w for w in worlds if w in times]
        degree, algorithm, rows = name.split()
        axis.plot(
            xs,
            [times[w] * 1e3 for w in xs],
            "--" if rows == "padded" else "-",
            color=colors[degree] if algorithm == "linear" else "tab:red" if degree == "r=S" else "tab:brown",
            marker="o" if algorithm == "linear" else "s",
            markersize=3,
            label=name,
        )
    axis.plot(worlds, [plan.best.seconds * 1e3 for plan in plans], "k-", linewidth=3, alpha=0.35, label="best")
    shape = plans[0].shape
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="GPUs (world size)",
        ylabel="predicted forward + backward (ms)",
        title=f"{plans[0].cluster.name}: E={shape.num_experts} M={shape.model_dim} H={shape.hidden_dim} "
        f"k={shape.top_k} T={shape.tokens_per_rank}/GPU f={shape.capacity_factor} "
        f"skew {max(shape.rows_per_expert()) / (sum(shape.rows_per_expert()) / shape.num_experts):g} (best d per line)",
    )
    axis.set_xticks(worlds, [str(w) for w in worlds])
    axis.legend(fontsize=7, ncol=2)
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
