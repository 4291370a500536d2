"""Every valid (parallel degree, overlap degree, all-to-all algorithm) gives the single-process
result on each rank's tokens: outputs, input / router / expert gradients, ragged batches."""

from __future__ import annotations

import pytest
import torch

from flexmoe.parallel import HIDDEN_AXIS
from tests.distributed.helpers import local_slice, reference_grads, twin_layers
from tests.distributed.launcher import run_distributed

TIGHT = dict(rtol=1e-10, atol=1e-12)


def _check_case(rank: int, options: dict, counts: list[int], call: dict) -> int:
    """All valid choices of one layer against its twin; returns how many choices were checked."""
    reference, layer = twin_layers(seed=len(counts) + options["num_experts"], **options)
    torch.manual_seed(100)  # same global batch on every rank
    x = torch.randn(sum(counts), options["model_dim"], dtype=torch.float64)
    upstream = torch.randn_like(x)
    outputs, input_grads, router_grads, expert_grads = reference_grads(reference, x, upstream, counts, **call)
    mine = local_slice(counts, rank)
    choices = layer.valid_parallel_choices()
    for choice in choices:
        layer.zero_grad(set_to_none=True)
        part = x[mine].clone().requires_grad_(True)
        out = layer(
            part,
            parallel_degree=choice.parallel_degree,
            overlap_degree=choice.overlap_degree,
            a2a_algorithm=choice.a2a_algorithm,
            **call,
        )
        (out * upstream[mine]).sum().backward()
        context = f"rank {rank} {options} {choice}"
        torch.testing.assert_close(out, outputs[rank], **TIGHT, msg=lambda m, c=context: f"{c} output: {m}")
        torch.testing.assert_close(part.grad, input_grads[rank], **TIGHT, msg=lambda m, c=context: f"{c} dx: {m}")
        for name, param in layer.router.named_parameters():
            torch.testing.assert_close(param.grad, router_grads[rank][name], **TIGHT)
        for name, param in layer.experts.expert_parameters().items():
            expected = layer.layout.shard(expert_grads[name], HIDDEN_AXIS[name])
            torch.testing.assert_close(
                param.grad, expected, **TIGHT, msg=lambda m, c=context, n=name: f"{c} grad {n}: {m}"
            )
    return len(choices)


def _parity_worker(rank: int, world_size: int, cases: list[tuple[dict, list[int], dict, int]]) -> None:
    for options, counts, call, expected_choices in cases:
        assert _check_case(rank, options, counts, call) == expected_choices, (options, world_size)


BASE = dict(model_dim=6, hidden_dim=8, top_k=2)


def test_world_2_every_choice_matches_single_process():
    cases = [
        # whole experts (S = 1): r in {0, 1}; ragged, one rank empty
        (dict(BASE, num_experts=4), [7, 0], {}, 1 + 3),
        (dict(BASE, num_experts=4, capacity_factor=0.5, gated=True), [9, 4], {}, 4),
        # sharded experts (S = 2): r in {0, 1, 2}
        (dict(BASE, num_experts=1, top_k=1), [5, 3], {}, 1 + 3 + 3),
        (dict(BASE, num_experts=1, top_k=1, capacity_factor=-0.5), [0, 6], {}, 7),
    ]
    run_distributed(_parity_worker, 2, cases)


@pytest.mark.parametrize("local_world_size", [2])
def test_world_4_every_choice_matches_single_process(local_world_size):
    # 2 simulated nodes of 2 ranks: 2dh is offered where the whole group exchanges.
    cases = [
        (dict(BASE, num_experts=8), [6, 0, 3, 5], {}, 1 + 3 * 2),
        (dict(BASE, num_experts=2, gated=True), [4, 5, 0, 2], {"top_k": 1}, 1 + 3 + 3 * 2),
        (dict(BASE, num_experts=1, top_k=1, capacity_factor=1.0), [3, 1, 4, 0], {}, 1 + 3 + 3 + 3 * 2),
    ]
    run_distributed(_parity_worker, 4, cases, local_world_size=local_world_size)
