"""A per-call argument invalid on one rank only: every rank raises the same error naming the
argument (agreed inside the count exchange), instead of one clear error and a hang or a closed
connection on the others; the group stays in step afterwards."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from flexmoe import MoELayer
from tests.distributed.launcher import run_distributed


def _on_rank_1(rank: int, bad, good):
    return bad if rank == 1 else good


def check_one_rank_invalid(rank: int, world_size: int) -> None:
    base = dict(model_dim=6, hidden_dim=8, num_experts=4, group=dist.group.WORLD)
    layer = MoELayer(**base).double()
    x = torch.randn(3 + rank, 6, dtype=torch.float64)
    cases = [
        ("top_k", dict(top_k=_on_rank_1(rank, 9, 2))),
        ("capacity_factor", dict(capacity_factor=_on_rank_1(rank, float("nan"), 1.0))),
        ("parallel choice", dict(parallel_degree=_on_rank_1(rank, 5, 1))),
        ("parallel choice", dict(a2a_algorithm=_on_rank_1(rank, "ring", "linear"))),
        ("padding_mask", dict(padding_mask=_on_rank_1(rank, torch.zeros(2, dtype=torch.bool), None))),
    ]
    for argument, call in cases:
        with pytest.raises(ValueError, match=rf"{argument} .*invalid on rank 1"):
            layer(x, **call)
    # The input itself: a wrong width, an integer tensor, not a tensor.
    for bad_input in (torch.randn(3, 5, dtype=torch.float64), torch.ones(3, 6, dtype=torch.int64), [[0.0] * 6]):
        with pytest.raises((ValueError, TypeError), match=r"x .*invalid on rank 1"):
            layer(_on_rank_1(rank, bad_input, x))
    # Task routing: task ids out of range on one rank.
    tasks = MoELayer(**base, granularity="task", num_tasks=3).double()
    with pytest.raises(ValueError, match=r"routing inputs .*invalid on rank 1"):
        tasks(x, task_ids=torch.full((3 + rank,), _on_rank_1(rank, 7, 1)))
    # Invalid on both ranks: each names its own.
    with pytest.raises(ValueError, match=r"invalid on rank 0.*invalid on rank 1"):
        layer(x, top_k=9)
    # Still in step: a valid call on both ranks runs.
    assert layer(x).shape == x.shape
    assert tasks(x, task_ids=torch.ones(3 + rank, dtype=torch.int64)).shape == x.shape


def test_argument_invalid_on_one_rank_raises_on_every_rank():
    # A short timeout: a rank left waiting in the exchange fails the test instead of hanging it.
    run_distributed(check_one_rank_invalid, 2, timeout_s=20)
