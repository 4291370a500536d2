"""The model's predictions on a published-cluster preset beside the Tutel paper's measured ratios
(2DH vs linear all-to-all at 2,048 GPUs; adaptive r; adaptive d), with no fitting."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from flexmoe.planner.config import ClusterConfig, LayerShape
from flexmoe.planner.model import linear_all_to_all, two_dh_all_to_all
from flexmoe.planner.plan import SWEEP_WORLD_SIZES, Plan, make_plan

# Per-rank all-to-all buffers from 64 KiB to 1 GiB (powers of 4).
A2A_BYTES: tuple[int, ...] = tuple(4**i * 1024 for i in range(3, 11))
# The layer grid the adaptive-r and adaptive-d gains are the largest over.
GRID_EXPERTS: tuple[int, ...] = (16, 64, 256)
GRID_TOKENS: tuple[int, ...] = (1024, 4096, 16384)
GRID_CAPACITY_FACTORS: tuple[float, ...] = (1.0, 4.0)


@dataclass(frozen=True)
class PaperRow:
    """One published ratio and the model's: its largest value and where it occurs."""

    claim: str
    published: float
    predicted: float
    where: str


def two_dh_speedup(cluster: ClusterConfig, world_size: int, nbytes: float) -> float:
    """Linear over 2dh all-to-all time for ``nbytes`` per rank over the whole world."""
    return linear_all_to_all(cluster, world_size, nbytes) / sum(two_dh_all_to_all(cluster, world_size, nbytes))


def _grid_plans(cluster: ClusterConfig, model_dim: int, hidden_dim: int) -> list[Plan]:
    plans = []
    for experts, tokens, factor, world in itertools.product(
        GRID_EXPERTS, GRID_TOKENS, GRID_CAPACITY_FACTORS, SWEEP_WORLD_SIZES
    ):
        shape = LayerShape(model_dim, hidden_dim, experts, 2, tokens, factor)
        plans.append(make_plan(shape, cluster, world))
    return plans


def _where(plan: Plan) -> str:
    s = plan.shape
    return f"W={plan.world_size} E={s.num_experts} T={s.tokens_per_rank} f={s.capacity_factor}"


def paper_comparison(cluster: ClusterConfig, model_dim: int = 2048, hidden_dim: int = 2048) -> list[PaperRow]:
    """The model's ratios on ``cluster`` (padded rows, as the paper's system) beside the paper's."""
    world = max(SWEEP_WORLD_SIZES)
    speedups = {nbytes: two_dh_speedup(cluster, world, nbytes) for nbytes in A2A_BYTES}
    best_bytes = max(speedups, key=speedups.get)
    rows = [
        PaperRow(
            "2DH vs linear all-to-all, 2,048 GPUs",
            20.7,
            speedups[best_bytes],
            f"{best_bytes / 2**20:g} MiB per GPU (1 GiB: {speedups[A2A_BYTES[-1]]:.2f}x)",
        )
    ]
    plans = _grid_plans(cluster, model_dim, hidden_dim)

    def gain(plan: Plan, static: dict[str, object], **common: object) -> float:
        fixed = plan.fastest(token_rows="padded", **static, **common).seconds
        return fixed / plan.fastest(token_rows="padded", **common).seconds

    # Linear all-to-all on both sides for r: 2dh runs at r = S only, so its gain is not r's.
    r_gains = [(gain(plan, {"parallel_degree": 1}, a2a_algorithm="linear"), plan) for plan in plans]
    d_gains = [(gain(plan, {"overlap_degree": 1}), plan) for plan in plans]
    for claim, published, gains in (
        ("adaptive r vs static r = 1", 1.74, r_gains),
        ("adaptive d vs static d = 1", 2.00, d_gains),
    ):
        value, plan = max(gains, key=lambda g: g[0])
        rows.append(PaperRow(claim, published, value, _where(plan)))
    return rows


def format_paper(rows: list[PaperRow], cluster: ClusterConfig, model_dim: int = 2048, hidden_dim: int = 2048) -> str:
    lines = [
        f"{cluster.name} preset, no fitting; layer grid M={model_dim} H={hidden_dim} k=2 bfloat16, "
        f"E in {GRID_EXPERTS}, T/GPU in {GRID_TOKENS}, f in {GRID_CAPACITY_FACTORS}, "
        f"W in {SWEEP_WORLD_SIZES[0]}..{SWEEP_WORLD_SIZES[-1]}; padded rows; r compared with linear all-to-all",
        f"{'published claim':<38} {'paper':>7} {'model (largest)':>16}  where",
    ]
    for row in rows:
        lines.append(f"{row.claim:<38} {row.published:>6.2f}x {row.predicted:>15.2f}x  {row.where}")
    return "\n".join(lines)
