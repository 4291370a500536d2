"""Multi-process tests (gloo on loopback), grouped so each spawn runs many checks.

World 2: every valid (r, d, a2a, exact) matches the single-process layer on each rank's tokens
(outputs and input / router / expert gradients; ragged batches, a rank with no tokens, no
tokens anywhere; a router sending 90% of the rows to one expert; whole and sharded experts;
custom experts), then the pipelined order of exchanges and compute (padded and exact), then
mismatched settings raise on every rank, then the host reads and collectives of one forward.
World 4 (2 simulated nodes of 2 ranks, so 2dh runs): the same parity, then the DDP recipe.
World 4 also: checkpoints of real distributed layers saved at world 4 and 2 load at 1, 2, 4.
Both: a layer with a run-time tuner tries every choice and matches the default-choice layer
over the tuning steps and after; a rerun on the tuner's cache starts tuned.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.checkpoint_checks import check_checkpoints
from tests.distributed.error_checks import check_ddp_recipe, check_mismatches
from tests.distributed.launcher import run_distributed
from tests.distributed.parity_checks import check_cases, check_custom_experts, check_pipeline_order
from tests.distributed.sync_checks import check_host_syncs
from tests.distributed.tuner_checks import check_tuned_layer, check_tuner_group

BASE = dict(model_dim=6, hidden_dim=8, top_k=2)


# Fixed capacity factor: one capacity bucket for every tuning step.
TUNED = dict(BASE, capacity_factor=1.0)


def _world_2(rank: int, world_size: int, cases, cache_dir: str) -> None:
    check_cases(rank, world_size, cases)
    for num_experts in (4, 1):  # whole experts (4 candidates), sharded (7)
        check_tuned_layer(rank, world_size, dict(TUNED, num_experts=num_experts, top_k=min(2, num_experts)), cache_dir)
    check_custom_experts(rank, world_size)
    with pytest.MonkeyPatch.context() as monkeypatch:
        check_pipeline_order(rank, world_size, monkeypatch)
    check_mismatches(rank, world_size)
    check_host_syncs(rank, world_size)


def _world_4(rank: int, world_size: int, cases, cache_dir: str) -> None:
    check_cases(rank, world_size, cases)
    check_tuned_layer(rank, world_size, dict(TUNED, num_experts=2), cache_dir)  # r in {0, 1, 2}, 2dh
    check_tuner_group(rank, world_size)
    check_host_syncs(rank, world_size)
    check_checkpoints(rank, world_size, cache_dir)
    # 2 experts over 4 ranks: b2 replicated over 2 shards, all three degrees.
    check_ddp_recipe(rank, world_size)


def test_world_2_choices_match_single_process_and_mismatches_raise(tmp_path):
    cases = [
        # whole experts (S = 1): r in {0, 1}; ragged, one rank empty
        (dict(BASE, num_experts=4), [7, 0], {}, 2 + 3 * 2),
        (dict(BASE, num_experts=4, capacity_factor=0.5, gated=True), [9, 4], {}, 8),
        (dict(BASE, num_experts=2, hidden_dim=16, model_dim=8, dtype=torch.float32), [6, 3], {}, 8),
        # sharded experts (S = 2): r in {0, 1, 2}
        (dict(BASE, num_experts=1, top_k=1), [5, 3], {}, 2 + 3 * 2 + 3 * 2),
        (dict(BASE, num_experts=1, top_k=1, capacity_factor=-0.5), [0, 6], {}, 14),
        # no tokens anywhere: capacity 0, every path still runs (zero expert gradients)
        (dict(BASE, num_experts=1, top_k=1), [0, 0], {}, 14),
        (dict(BASE, num_experts=4), [0, 0], {}, 8),  # two local experts: the regrouping path, empty
        # a skewed router: 90% of the first choices go to expert 0 (dropless)
        (dict(BASE, num_experts=4, top_k=1, skew=0.9), [10, 10], {}, 8),
        # float32 (grouped_mm on exact counts): every row to expert 0, rank 1's expert gets none
        (dict(BASE, num_experts=2, top_k=1, model_dim=8, hidden_dim=16, dtype=torch.float32, skew=1.0), [5, 3], {}, 8),
    ]
    run_distributed(_world_2, 2, cases, str(tmp_path))


def test_world_4_choices_match_single_process_and_ddp_recipe(tmp_path):
    # 2 simulated nodes of 2 ranks: 2dh is offered where the whole group exchanges.
    cases = [
        (dict(BASE, num_experts=8), [6, 0, 3, 5], {}, 2 + 3 * 2 + 3),
        (dict(BASE, num_experts=2, gated=True), [4, 5, 0, 2], {"top_k": 1}, 2 + 3 * 2 + 3 * 2 + 3),
        (dict(BASE, num_experts=1, top_k=1, capacity_factor=1.0), [3, 1, 4, 0], {}, 2 + 3 * 2 * 3 + 3),
        (dict(BASE, num_experts=4, skew=0.9), [9, 0, 6, 5], {}, 2 + 3 * 2 + 3),
    ]
    run_distributed(_world_4, 4, cases, str(tmp_path), local_world_size=2)
