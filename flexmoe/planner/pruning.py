"""Which candidates a run-time tuner measures once the planner predicts them.

At a large world every candidate costs a full step of the whole cluster to time, and the
candidate count grows with the divisors of S, so from :data:`PRUNE_FROM_WORLD_SIZE` ranks on the
tuner measures only the planner's fastest few (:func:`candidates_to_measure`).
:func:`tuner_predictor` turns a cluster description into the ``predictor`` a
:class:`flexmoe.Tuner` takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

from flexmoe.parallel.config import check_int
from flexmoe.planner.config import ClusterConfig, LayerShape
from flexmoe.planner.model import PlanChoice, predict

PRUNE_FROM_WORLD_SIZE = 64
MEASURED_PER_KEY = 3

C = TypeVar("C", bound=Hashable)


def candidates_to_measure(
    predictions: Mapping[C, float | None], world_size: int, limit: int = MEASURED_PER_KEY
) -> list[C]:
    """The candidates to time, in the mapping's order: all of them below
    :data:`PRUNE_FROM_WORLD_SIZE` ranks or when no prediction is known, else the ``limit`` with
    the smallest predicted seconds (ties: the earlier one; None or NaN counts as slowest).

    predictions: candidate -> predicted seconds (every candidate the layer offers)."""
    check_int("world_size", world_size, 1)
    check_int("limit", limit, 1)
    if not predictions:
        raise ValueError("predictions must not be empty: there is no candidate to measure")
    candidates = list(predictions)

    def predicted(index: int) -> tuple[float, int]:
        seconds = predictions[candidates[index]]
        unknown = seconds is None or not math.isfinite(seconds)
        return (math.inf if unknown else float(seconds), index)

    if world_size < PRUNE_FROM_WORLD_SIZE or all(predicted(i)[0] == math.inf for i in range(len(candidates))):
        return candidates
    fastest = sorted(range(len(candidates)), key=predicted)[:limit]
    return [candidates[i] for i in sorted(fastest)]


def plan_choice(choice: Any) -> PlanChoice:
    """A layer's choice (``flexmoe.parallel.ParallelChoice``) as the planner's: its r, d and
    algorithm; exact or padded token rows (``choice.exact``)."""
    return PlanChoice(
        choice.parallel_degree,
        choice.overlap_degree,
        choice.a2a_algorithm,
        "exact" if choice.exact else "padded",
    )


def shape_for_key(key: Any) -> LayerShape:
    """The :class:`LayerShape` of a :class:`flexmoe.tuner.TuningKey`: its shapes and dtype, with the
    tokens per rank that fill its capacity bucket at a uniform load (capacity factor 1)."""
    num_experts = key.local_experts * key.world_size // key.shards_per_expert
    tokens = max(1, key.capacity_bucket * num_experts // key.top_k)
    return LayerShape(
        model_dim=key.model_dim,
        hidden_dim=key.hidden_dim,
        num_experts=num_experts,
        top_k=key.top_k,
        tokens_per_rank=tokens,
        capacity_factor=1.0,
        dtype=key.dtype,
    )


def tuner_predictor(cluster: ClusterConfig) -> Callable[[Any, Sequence[Any]], dict[Any, float]]:
    """``predictor(key, candidates) -> {candidate: predicted seconds}`` for ``Tuner(predictor=...)``:
    the planner's forward + backward seconds of the expert step (all-to-all, experts, all-to-all;
    what the tuner times) for each candidate on ``cluster``. A key whose dtype the cluster has
    no GEMM throughput for gets no predictions (``{}``): the tuner then measures every candidate."""

    def predictor(key: Any, candidates: Sequence[Any]) -> dict[Any, float]:
        if key.dtype not in cluster.gemm_throughput:
            return {}
        shape = shape_for_key(key)
        return {
            choice: predict(shape, cluster, key.world_size, plan_choice(choice)).expert_step for choice in candidates
        }

    return predictor


def timings_record(
    candidates: Sequence[Any], predicted: Mapping[Any, float] | None, measured: Mapping[Any, float]
) -> list[dict[str, Any]]:
    """Per candidate (JSON): its choice, predicted seconds (None: no predictor) and measured
    seconds (None: pruned, never timed), side by side, for a tuner cache entry."""
    return [
        {
            "choice": choice.to_json(),
            "predicted_seconds": None if predicted is None else predicted.get(choice),
            "measured_seconds": measured.get(choice),
        }
        for choice in candidates
    ]
