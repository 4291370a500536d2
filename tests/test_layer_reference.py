"""MoELayer against the one-hot/einsum reference, forward and backward, over the option grid."""

import dataclasses
import itertools

import pytest
import torch

from flexmoe.reference import reference_moe

from .conftest import make_layer, params_of

GRID = list(
    itertools.product(
        [1, 2, 4],  # top_k
        [1.0, 0.5, 0.0, -1.5],  # capacity_factor (0.5 drops)
        [False, True],  # batch_prioritized_routing
        [False, True],  # normalize_gate
        ["linear", "cosine"],
    )
)


def _run_both(layer, x, **call):
    """Output, aux loss and gradients (input + every parameter) of the layer and of the reference."""
    upstream = torch.randn(x.shape, dtype=x.dtype)
    results = []
    for use_reference in (False, True):
        x_ = x.detach().clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        if use_reference:
            params = params_of(layer)
            out, aux, capacity = reference_moe(params, layer.config, x_, **call)
        else:
            out, aux, capacity = layer(x_, **call), layer.aux_loss, layer.stats.capacity
            params = dict(layer.named_parameters())
        if aux.requires_grad:
            torch.autograd.backward([out, aux], [upstream, torch.ones_like(aux)])
        else:
            out.backward(upstream)
        grads = {"x": x_.grad, **{n: p.grad for n, p in params.items()}}
        results.append((out.detach(), aux.detach(), capacity, grads))
    return results


@pytest.mark.parametrize("top_k,capacity_factor,bpr,normalize,router", GRID)
def test_float64_padded_matches_reference(top_k, capacity_factor, bpr, normalize, router):
    layer = make_layer(
        top_k=top_k,
        capacity_factor=capacity_factor,
        batch_prioritized_routing=bpr,
        normalize_gate=normalize,
        router=router,
        z_loss=0.01,
    )
    assert not layer.uses_grouped_layout(torch.float64)
    x = torch.randn(37, 8, dtype=torch.float64)  # odd token count
    (out, aux, cap, g), (ref_out, ref_aux, ref_cap, ref_g) = _run_both(layer, x)
    assert cap == ref_cap
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-10, atol=1e-12)
    for name, ref in ref_g.items():
        assert g[name] is not None, name
        torch.testing.assert_close(g[name], ref, rtol=1e-9, atol=1e-11, msg=name)
    if capacity_factor == 0.5:
        assert int(layer.stats.dropped) > 0  # the grid really exercises drops


@pytest.mark.parametrize("aux_loss", ["gshard", "load_importance", None])
@pytest.mark.parametrize("gated,bias,activation", [(False, True, "relu"), (True, False, "silu"), (True, True, "gelu")])
def test_expert_variants_and_losses_match_reference(aux_loss, gated, bias, activation):
    layer = make_layer(aux_loss=aux_loss, gated=gated, bias=bias, activation=activation, capacity_factor=1.0)
    x = torch.randn(3, 11, 8, dtype=torch.float64)
    (out, aux, _, g), (ref_out, ref_aux, _, ref_g) = _run_both(layer, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-10, atol=1e-12)
    for name, ref in ref_g.items():
        torch.testing.assert_close(g[name], ref, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("top_k,capacity_factor", [(1, 1.0), (2, 0.5), (2, 0.0), (4, -1.5)])
def test_grouped_float32_matches_padded_and_reference(top_k, capacity_factor):
    layer = make_layer(torch.float32, num_experts=5, top_k=top_k, capacity_factor=capacity_factor, gated=True)
    x = torch.randn(53, 8)
    outs = []
    for layout in ("grouped", "padded"):
        layer.config = dataclasses.replace(layer.config, expert_kernel=layout)
        x_ = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = layer(x_)
        out.backward(torch.ones_like(out))
        outs.append((out.detach(), x_.grad, [p.grad.clone() for p in layer.parameters()]))
    (g_out, g_x, g_p), (p_out, p_x, p_p) = outs
    torch.testing.assert_close(g_out, p_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_x, p_x, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_p, p_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ref_out, _, _ = reference_moe(params_of(layer), layer.config, x)
    torch.testing.assert_close(g_out, ref_out, rtol=1e-5, atol=1e-6)


def test_custom_experts_module_is_used():
    base = make_layer(capacity_factor=0.0)

    class ScaledExperts(torch.nn.Module):
        """Custom experts: a per-expert scale, mapping [E, C, M] -> [E, C, M]."""

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.arange(1.0, 7.0, dtype=torch.float64))

        def forward(self, x):
            return x * self.scale[:, None, None]

    layer = type(base)(base.config, experts=ScaledExperts()).double().eval()
    layer.router.load_state_dict(base.router.state_dict())
    x = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    # Expected: sum over kept choices of gate * scale[expert] * x.
    plan_scores = torch.softmax(x @ layer.router.weight.T, -1)
    gates, experts = plan_scores.topk(2, dim=1)
    gates = gates / gates.sum(1, keepdim=True)
    expected = ((gates * layer.experts.scale[experts]).sum(1, keepdim=True)) * x
    assert layer.stats.capacity > 0 and int(layer.stats.dropped) == 0
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert layer.experts.scale.grad is not None and x.grad is not None


def test_per_call_overrides_equal_configured_layer():
    layer = make_layer(top_k=2, capacity_factor=1.0)
    other = make_layer(top_k=1, capacity_factor=0.0)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(29, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x, top_k=1, capacity_factor=0.0), other(x))
    assert layer.stats.top_k == 1 and int(layer.stats.dropped) == 0
    # The override lasts one call only.
    layer(x)
    assert layer.stats.top_k == 2


def test_empty_batch():
    layer = make_layer(torch.float32)
    x = torch.randn(0, 8, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 8)
    (out.sum() + layer.aux_loss).backward()
    assert layer.stats.num_tokens == 0 and layer.stats.capacity == 0
    assert float(layer.aux_loss) == 0.0
    assert layer(torch.randn(2, 0, 8)).shape == (2, 0, 8)


def test_leading_dims_are_preserved():
    layer = make_layer()
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    out = layer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(-1, 8), layer(x.reshape(-1, 8)))


def test_gate_noise_only_in_training():
    layer = make_layer(gate_noise=1.0, aux_loss="load_importance", aux_loss_in_backward=False)
    x = torch.randn(40, 8, dtype=torch.float64)
    eval_out = layer(x)
    torch.testing.assert_close(eval_out, layer(x))
    layer.train()
    noisy = layer(x)
    assert not torch.allclose(noisy, eval_out)
    layer.aux_loss.backward()  # the smooth load estimate carries a gradient to the router
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k,capacity_factor,gated", [(1, 1.0, False), (2, 0.5, True), (2, 0.0, False)])
def test_per_expert_float64_matches_reference(top_k, capacity_factor, gated):
    """The per-expert kernel runs float64 on exact counts: tight against the reference."""
    layer = make_layer(top_k=top_k, capacity_factor=capacity_factor, gated=gated, expert_kernel="per_expert")
    x = torch.randn(41, 8, dtype=torch.float64)
    (out, aux, cap, g), (ref_out, ref_aux, ref_cap, ref_g) = _run_both(layer, x)
    assert cap == ref_cap
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-10, atol=1e-12)
    for name, ref in ref_g.items():
        torch.testing.assert_close(g[name], ref, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("gated", [False, True])
def test_per_expert_kernel_with_empty_experts_matches_padded(gated):
    """Experts with no row get zero gradients (not missing ones); rows land where they belong."""
    layer = make_layer(gated=gated)
    counts = torch.tensor([3, 0, 5, 2, 0, 1])
    rows = torch.randn(int(counts.sum()), 8, dtype=torch.float64, requires_grad=True)
    padded = torch.zeros(6, 5, 8, dtype=torch.float64)
    starts = torch.cumsum(counts, 0) - counts
    for e in range(6):
        padded[e, : counts[e]] = rows[starts[e] : starts[e] + counts[e]]
    upstream = torch.randn(rows.shape, dtype=torch.float64)
    layer.zero_grad()
    got_out = layer.experts.forward_per_expert(rows, counts)
    got_out.backward(upstream)
    got = [rows.grad.clone()] + [p.grad.clone() for p in layer.experts.parameters()]
    rows.grad, expected_out = None, layer.experts(padded)
    layer.zero_grad()
    expected_grad_out = torch.zeros_like(expected_out)
    for e in range(6):
        expected_grad_out[e, : counts[e]] = upstream[starts[e] : starts[e] + counts[e]]
    expected_out.backward(expected_grad_out)
    for e in range(6):
        torch.testing.assert_close(got_out[starts[e] : starts[e] + counts[e]], expected_out[e, : counts[e]])
    expected = [rows.grad] + [p.grad for p in layer.experts.parameters()]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(got[1][1]) == 0  # w1 of expert 1 (no rows): zero gradient


def test_auto_picks_per_expert_on_cpu_only_for_many_rows():
    from flexmoe.experts import PER_EXPERT_MIN_ROWS

    layer = make_layer(torch.float32, num_experts=4, hidden_dim=16, top_k=1)
    layer.record_plan = True
    for tokens, expected in ((8, "grouped"), (4 * PER_EXPERT_MIN_ROWS, "per_expert")):
        x = torch.randn(tokens, 8)
        layer(x)
        assert layer.expert_kernel(x, layer.last_plan) == expected
    # float64 (no grouped_mm): exact counts per expert, not a [experts, largest load, dim] buffer
    assert layer.expert_kernel(x.double(), layer.last_plan) == "per_expert"
    with torch.no_grad():  # every token to expert 0: 2 * PER_EXPERT_MIN_ROWS rows on one busy expert
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0
    x = torch.rand(2 * PER_EXPERT_MIN_ROWS, 8)
    layer(x)
    assert layer.stats.kept_per_expert.tolist() == [2 * PER_EXPERT_MIN_ROWS, 0, 0, 0]
    assert layer.expert_kernel(x, layer.last_plan) == "per_expert"  # averaged over busy experts only
