"""dispatch/combine autograd against torch.autograd.gradcheck and plain indexing."""

import pytest
import torch

from flexmoe.ops import combine, dispatch


def _indices(num_tokens=7, kept=9, num_rows=12):
    token_index = torch.randint(num_tokens, (kept,))
    rows = torch.randperm(num_rows)[:kept]
    return token_index, rows


def test_dispatch_gradcheck_both_layouts():
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    token_index, rows = _indices()
    assert torch.autograd.gradcheck(lambda x: dispatch(x, token_index, rows, 12), (x,))
    assert torch.autograd.gradcheck(lambda x: dispatch(x, token_index), (x,))


def test_combine_gradcheck_both_layouts():
    token_index, rows = _indices()
    gates = torch.rand(9, dtype=torch.float64, requires_grad=True)
    padded = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    grouped = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda o, g: combine(o, g, token_index, rows, 7), (padded, gates))
    assert torch.autograd.gradcheck(lambda o, g: combine(o, g, token_index, None, 7), (grouped, gates))


@pytest.mark.parametrize("requires_grad", [False, True])  # the inference path skips autograd.Function
def test_dispatch_combine_match_plain_indexing(requires_grad):
    token_index, rows = _indices()
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=requires_grad)
    buffer = dispatch(x, token_index, rows, 12)
    expected = torch.zeros(12, 3, dtype=torch.float64)
    expected[rows] = x[token_index]
    torch.testing.assert_close(buffer.detach(), expected.detach())
    assert buffer.requires_grad == requires_grad
    gates = torch.rand(9, dtype=torch.float64)
    out = combine(buffer, gates, token_index, rows, 7)
    grouped_out = combine(dispatch(x, token_index), gates, token_index, None, 7)
    expected_out = torch.zeros(7, 3, dtype=torch.float64)
    for i in range(9):
        expected_out[token_index[i]] += gates[i] * x.detach()[token_index[i]]
    torch.testing.assert_close(out.detach(), expected_out)
    torch.testing.assert_close(grouped_out.detach(), expected_out)
    assert out.requires_grad == grouped_out.requires_grad == requires_grad


def test_half_precision_combine_keeps_float32_gate_grad():
    token_index, rows = _indices()
    expert_out = torch.randn(12, 3, dtype=torch.bfloat16, requires_grad=True)
    gates = torch.rand(9, requires_grad=True)
    out = combine(expert_out, gates, token_index, rows, 7)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert gates.grad.dtype == torch.float32 and expert_out.grad.dtype == torch.bfloat16
