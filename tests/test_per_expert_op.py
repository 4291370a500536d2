"""flexmoe.ops.per_expert: the hand-written per-expert FFN against plain autograd per expert."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexmoe.ops.per_expert import per_expert_ffn

E, M, H = 5, 6, 7
COUNTS = [3, 0, 4, 1, 0]


def weights(gated: bool, bias: bool) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)

    def make(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()

    return {
        "w1": make(E, M, H),
        "b1": make(E, H) if bias else None,
        "w3": make(E, M, H) if gated else None,
        "w2": make(E, H, M),
        "b2": make(E, M) if bias else None,
    }


def loop_reference(x, counts, activation, w):
    """Plain autograd, one expert at a time (slices of x and of the weights)."""
    outs, start = [], 0
    for e, count in enumerate(counts):
        piece = x[start : start + count]
        start += count
        pre = piece @ w["w1"][e] + (0 if w["b1"] is None else w["b1"][e])
        hidden = activation(pre) * (1 if w["w3"] is None else piece @ w["w3"][e])
        outs.append(hidden @ w["w2"][e] + (0 if w["b2"] is None else w["b2"][e]))
    return torch.cat(outs)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", [F.gelu, F.relu, F.silu, lambda t: torch.tanh(t) * t])
def test_matches_plain_autograd_forward_and_backward(gated, bias, activation):
    w = weights(gated, bias)
    x = torch.randn(sum(COUNTS), M, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(sum(COUNTS), M, dtype=torch.float64)
    present = {k: v for k, v in w.items() if v is not None}

    out = per_expert_ffn(x, COUNTS, activation, **w)
    got = torch.autograd.grad(out, [x, *present.values()], upstream)
    expected_out = loop_reference(x, COUNTS, activation, w)
    expected = torch.autograd.grad(expected_out, [x, *present.values()], upstream)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(["x", *present], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert torch.count_nonzero(got[1][1]) == 0  # w1 of expert 1 (no rows): a zero gradient


def test_frozen_inputs_get_no_gradient_and_second_derivative_refuses():
    w = weights(gated=True, bias=True)
    w["w1"].requires_grad_(False)
    x = torch.randn(sum(COUNTS), M, dtype=torch.float64)  # no grad wanted for the input
    out = per_expert_ffn(x, COUNTS, torch.nn.functional.silu, **w)
    out.sum().backward()
    assert w["w1"].grad is None and w["w2"].grad is not None and w["w3"].grad is not None

    x.requires_grad_()
    out = per_expert_ffn(x, COUNTS, torch.nn.functional.silu, **w)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()


def test_counts_must_cover_the_rows_and_empty_input_works():
    w = weights(gated=False, bias=True)
    with pytest.raises(ValueError, match="counts must sum"):
        per_expert_ffn(torch.randn(3, M, dtype=torch.float64), COUNTS, torch.relu, **w)
    out = per_expert_ffn(torch.randn(0, M, dtype=torch.float64), [0] * E, torch.relu, **w)
    assert out.shape == (0, M)
