"""torch.compile: every kernel and dtype compiles and matches eager forward and backward; graph breaks."""

import pytest
import torch

from flexmoe import MoELayer
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


def test_fixed_capacity_route_plan_experts_fullgraph():
    """route_scores -> plan_routes -> run_experts with a fixed capacity compiles as one graph
    (under compilation the plan keeps the dropped entries: static shapes)."""
    torch._dynamo.reset()
    layer = _layer("padded", 1.0)

    def step(x):
        _, _, scores = layer.route_scores(x)
        return layer.run_experts(x, plan_routes(scores, 2, 0.0, capacity=8), top_k=2)

    x = torch.randn(24, 16)
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x), step(x))


# --- graph breaks ---------------------------------------------------------------------------


def _layer(kernel, capacity_factor, **options):
    torch.manual_seed(0)
    return MoELayer(
        model_dim=16, num_experts=4, hidden_dim=32, expert_kernel=kernel, capacity_factor=capacity_factor, **options
    )


@pytest.mark.parametrize("kernel", ["padded", "per_expert", "grouped", "auto"])
@pytest.mark.parametrize("train", [True, False])
def test_fixed_capacity_layer_compiles_fullgraph(kernel, train):
    """With a fixed capacity the plan keeps static shapes under compilation: one graph, no host read."""
    torch._dynamo.reset()
    layer = _layer(kernel, 1.25).train(train)
    x = torch.randn(24, 16, requires_grad=train)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.set_grad_enabled(train):
        out = compiled(x)
        expected = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kernel", "max_breaks"), [("padded", 1), ("per_expert", 0), ("grouped", 0), ("auto", 0)])
def test_dropless_graph_breaks(kernel, max_breaks):
    """Dropless: the exact-count kernels need no host read; the padded layout reads its capacity
    (the largest load) once, in the layer's forward."""
    torch._dynamo.reset()
    layer = _layer(kernel, 0.0, bias=True, gated=True)
    # Enough rows that "auto" considers the per-expert kernel (which counts busy experts in eager).
    explanation = torch._dynamo.explain(layer)(torch.randn(256, 16, requires_grad=True))
    assert explanation.graph_break_count <= max_breaks, [r.reason for r in explanation.break_reasons]


# --- static-shape plans -----------------------------------------------------------------------


def test_static_plan_compacts_to_the_eager_plan():
    scores = torch.softmax(torch.randn(40, 6, generator=torch.Generator().manual_seed(1)), -1)
    eager = plan_routes(scores, 2, 0.5)
    static = plan_routes(scores, 2, 0.5, static_shapes=True)
    assert static.num_entries == 80 and static.num_kept == eager.num_kept < 80
    compact = static.compact()
    for name in ("token_index", "expert_index", "gates", "slot", "choice_index"):
        torch.testing.assert_close(getattr(compact, name), getattr(eager, name), msg=name)
    assert torch.all(static.gates[eager.num_kept :] == 0)
    assert torch.all(static.slot[eager.num_kept :] >= static.capacity)


@pytest.mark.parametrize("kernel", ["padded", "per_expert", "grouped"])
def test_static_plan_runs_as_the_eager_plan(kernel):
    """Each kernel gives the same output and gradients on a static-shape plan (dropped entries
    kept, gate 0) as on the eager plan (dropped entries removed)."""
    layer = _layer(kernel, 0.5, bias=True, gated=True)
    x = torch.randn(40, 16)
    _, _, scores = layer.route_scores(x)
    results = []
    for static in (False, True):
        tokens = x.clone().requires_grad_()
        plan = plan_routes(scores.detach().requires_grad_(), 2, 0.5, static_shapes=static)
        out = layer.run_experts(tokens, plan)
        out.square().sum().backward()
        grads = [tokens.grad, *(p.grad.clone() for p in layer.experts.parameters())]
        layer.zero_grad(set_to_none=True)
        results.append((out.detach(), grads))
    (eager_out, eager_grads), (static_out, static_grads) = results
    torch.testing.assert_close(static_out, eager_out)
    for eager_grad, static_grad in zip(eager_grads, static_grads):
        torch.testing.assert_close(static_grad, eager_grad)


def test_layers_with_different_capacity_factors_compile_fullgraph():
    """A second compiled layer with another factor makes dynamo trace the factor as a symbolic
    float; the capacity (a shape) must still come out as a plain int of the input's size."""
    torch._dynamo.reset()
    for capacity_factor, tokens in [(1.0, 16), (1.25, 16), (1.5, 24), (2.0, 32)]:
        layer = _layer("padded", capacity_factor)
        x = torch.randn(tokens, 16)
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))
