"""torch.compile: every kernel and dtype compiles and matches eager forward and backward; graph breaks."""

import pytest
import torch

from flexmoe import MoELayer
from flexmoe.ops import combine, dispatch
from flexmoe.routing import plan_routes

KERNELS = ["padded", "per_expert", "grouped"]


def _run(layer, x, call=None):
    x = x.clone().requires_grad_()
    out = (layer if call is None else call)(x)
    out.float().square().sum().backward()
    grads = {"x": x.grad, **{name: p.grad.clone() for name, p in layer.named_parameters()}}
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("capacity_factor", [1.0, 0.0])
def test_compiled_layer_matches_eager(kernel, dtype, capacity_factor):
    if kernel == "grouped" and dtype == torch.float64:
        pytest.skip("grouped_mm has no float64")
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoELayer(
        model_dim=32, num_experts=4, hidden_dim=32, gated=True, expert_kernel=kernel, capacity_factor=capacity_factor
    ).to(dtype)
    x = torch.randn(48, 32, dtype=dtype)
    eager_out, eager_grads = _run(layer, x)
    compiled_out, compiled_grads = _run(layer, x, torch.compile(layer))
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(compiled_out, eager_out, **tol)
    for name in eager_grads:  # router included: the aux loss's gradient survives compilation
        torch.testing.assert_close(compiled_grads[name].float(), eager_grads[name].float(), **tol, msg=name)


@pytest.mark.parametrize("kernel", ["per_expert", "grouped"])
def test_dropless_exact_count_kernels_compile_without_graph_breaks(kernel):
    torch._dynamo.reset()
    layer = MoELayer(model_dim=16, num_experts=4, hidden_dim=32, expert_kernel=kernel, capacity_factor=0.0)
    explanation = torch._dynamo.explain(layer)(torch.randn(24, 16, requires_grad=True))
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]


def test_fixed_capacity_route_dispatch_experts_combine_fullgraph():
    """plan -> dispatch -> experts -> combine with a fixed capacity compiles as one graph (the
    kept entries' count is data dependent: dynamo needs capture_dynamic_output_shape_ops)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoELayer(model_dim=16, num_experts=4, hidden_dim=32, expert_kernel="padded")

    def step(x):
        _, _, scores = layer.route_scores(x)
        plan = plan_routes(scores, 2, 0.0, capacity=8)
        rows = plan.padded_rows()
        buffer = dispatch(x, plan.token_index, rows, plan.num_experts * plan.capacity)
        out = layer.experts(buffer.view(plan.num_experts, plan.capacity, 16))
        return combine(out.reshape(-1, 16), plan.gates, plan.token_index, rows, x.shape[0])

    x = torch.randn(24, 16)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(step, fullgraph=True)(x)
    torch.testing.assert_close(compiled, step(x))
