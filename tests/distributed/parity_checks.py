"""Rank-side check: every valid (parallel degree, overlap degree, all-to-all algorithm) gives the
single-process result on each rank's tokens: outputs, input / router / expert gradients."""

from __future__ import annotations

import torch

from flexmoe.parallel import HIDDEN_AXIS
from tests.distributed.helpers import local_slice, reference_grads, twin_layers

TIGHT = dict(rtol=1e-10, atol=1e-12)


def check_case(rank: int, options: dict, counts: list[int], call: dict) -> int:
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


def check_cases(rank: int, world_size: int, cases: list[tuple[dict, list[int], dict, int]]) -> None:
    """cases: (layer options, tokens per rank, per-call options, expected number of valid choices)."""
    for options, counts, call, expected_choices in cases:
        assert check_case(rank, options, counts, call) == expected_choices, (options, world_size)
