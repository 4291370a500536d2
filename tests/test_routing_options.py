"""Sigmoid scores, route_scale, shared experts, loss-free balancing, group-limited routing and a
fixed expert capacity: MoELayer against the float64 reference, forward and backward."""

import itertools

import pytest
import torch

from flexmoe import MoEConfig, MoELayer
from flexmoe.reference import reference_moe
from flexmoe.routing import select_experts

from .conftest import make_layer

SHARED = [(0, False), (2, False), (1, True)]  # (num_shared_experts, shared_expert_gate)
GROUPS = [(1, None), (4, 2), (4, 1)]  # (num_groups, top_groups) over 8 experts
GRID = list(itertools.product(["softmax", "sigmoid"], GROUPS, [0.0, 0.5], SHARED, [False, True]))


def routing_layer(dtype=torch.float64, **options) -> MoELayer:
    """make_layer with 8 experts; a random load-balance bias and shared-expert biases when present."""
    layer = make_layer(dtype, **{"num_experts": 8, **options})
    with torch.no_grad():
        if layer.load_balancer is not None:
            layer.load_balancer.bias.normal_(std=0.3)
        if layer.shared_experts is not None and layer.config.bias:
            layer.shared_experts.ffn.b1.normal_(std=0.1)
            layer.shared_experts.ffn.b2.normal_(std=0.1)
    return layer


def assert_matches_reference(layer: MoELayer, x: torch.Tensor, **call) -> None:
    """Output, aux loss, capacity and the gradients of x and of every parameter, layer vs reference."""
    upstream = torch.randn(x.shape, dtype=x.dtype)
    results = []
    for use_reference in (False, True):
        x_ = x.detach().clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        params = dict(layer.named_parameters())
        if use_reference:
            out, aux, capacity = reference_moe({**params, **dict(layer.named_buffers())}, layer.config, x_, **call)
        else:
            out, aux, capacity = layer(x_, **call), layer.aux_loss, layer.stats.capacity
        torch.autograd.backward([out, aux], [upstream, torch.ones_like(aux)]) if aux.requires_grad else out.backward(
            upstream
        )
        results.append((out.detach(), aux.detach(), capacity, {"x": x_.grad, **{n: p.grad for n, p in params.items()}}))
    (out, aux, cap, grads), (ref_out, ref_aux, ref_cap, ref_grads) = results
    assert cap == ref_cap
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-10, atol=1e-12)
    for name, ref in ref_grads.items():
        assert grads[name] is not None and ref is not None, name
        torch.testing.assert_close(grads[name], ref, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("score_function,groups,capacity_factor,shared,loss_free", GRID)
def test_routing_options_match_reference(score_function, groups, capacity_factor, shared, loss_free):
    layer = routing_layer(
        score_function=score_function,
        route_scale=2.5 if score_function == "sigmoid" else 1.0,
        num_groups=groups[0],
        top_groups=groups[1],
        capacity_factor=capacity_factor,
        num_shared_experts=shared[0],
        shared_hidden_dim=5,
        shared_expert_gate=shared[1],
        loss_free_balance=loss_free,
        gated=shared[0] == 2,
        z_loss=0.01,
    )
    assert_matches_reference(layer, torch.randn(37, 8, dtype=torch.float64))
    if capacity_factor == 0.5:
        assert int(layer.stats.dropped) > 0


@pytest.mark.parametrize("normalize,bpr", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("aux_loss", ["gshard", "load_importance"])
def test_sigmoid_gates_and_aux_losses_match_reference(normalize, bpr, aux_loss):
    layer = routing_layer(
        score_function="sigmoid",
        normalize_gate=normalize,
        batch_prioritized_routing=bpr,
        aux_loss=aux_loss,
        loss_free_balance=True,
        capacity_factor=0.75,
        top_k=3,
    )
    assert_matches_reference(layer, torch.randn(2, 13, 8, dtype=torch.float64))


def test_fixed_expert_capacity_matches_reference_and_per_call_factor_overrides_it():
    layer = routing_layer(expert_capacity=3, top_k=1, normalize_gate=False)
    x = torch.randn(40, 8, dtype=torch.float64)
    assert_matches_reference(layer, x)
    assert layer.stats.capacity == 3 and int(layer.stats.dropped) > 0
    assert_matches_reference(layer, x, capacity_factor=0.0)
    assert layer.stats.capacity > 3 and int(layer.stats.dropped) == 0


def test_bias_steers_the_choice_but_not_the_gate():
    layer = routing_layer(top_k=1, normalize_gate=False, loss_free_balance=True, score_function="sigmoid")
    with torch.no_grad():
        layer.load_balancer.bias.zero_()
        layer.load_balancer.bias[5] = 100.0  # every token picks expert 5
    x = torch.randn(9, 8, dtype=torch.float64)
    out = layer(x)
    assert layer.stats.tokens_per_expert.tolist() == [0, 0, 0, 0, 0, 9, 0, 0]
    gate = torch.sigmoid(x @ layer.router.weight.T)[:, 5:6]  # the unbiased score
    single = layer.experts(x.unsqueeze(0).expand(8, -1, -1).contiguous())[5]
    torch.testing.assert_close(out, gate * single)
    assert not layer.load_balancer.bias.requires_grad


def test_load_balance_update_accumulates_training_loads_only():
    layer = routing_layer(loss_free_balance=True, balance_update_rate=0.01, top_k=1, aux_loss=None)
    with torch.no_grad():
        layer.load_balancer.bias.zero_()
    layer.train()
    x1, x2 = torch.randn(30, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    layer(x1)
    loads = layer.stats.tokens_per_expert.clone()
    layer(x2)
    loads += layer.stats.tokens_per_expert
    layer.eval()
    layer(torch.randn(50, 8, dtype=torch.float64))  # not counted
    used = layer.update_load_balance_bias()
    torch.testing.assert_close(used, loads.to(used.dtype))
    expected = 0.01 * torch.sign(loads.double().mean() - loads.double())
    torch.testing.assert_close(layer.load_balancer.bias, expected.to(layer.load_balancer.bias.dtype))
    assert float(layer.load_balancer.pending_load.abs().sum()) == 0.0
    before = layer.load_balancer.bias.clone()
    layer.update_load_balance_bias()  # nothing recorded since: no change
    torch.testing.assert_close(layer.load_balancer.bias, before)
    state = layer.state_dict()
    assert "load_balancer.bias" in state and "load_balancer.pending_load" not in state
    clone = MoELayer(layer.config).double()
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.load_balancer.bias, layer.load_balancer.bias)


def test_group_limited_choices_stay_in_top_groups():
    scores = torch.rand(200, 16)
    bias = torch.randn(16) * 0.1
    experts = select_experts(scores, 3, selection_bias=bias, num_groups=8, top_groups=2)
    groups_used = torch.tensor([len(set((row // 2).tolist())) for row in experts])
    assert int(groups_used.max()) <= 2 and int(groups_used.max()) == 2
    # The groups kept are the best by their top-2 biased score sum.
    choice = (scores + bias).view(200, 8, 2).sum(-1)
    best_groups = choice.topk(2, dim=1).indices.sort(dim=1).values
    for row, kept in zip(experts, best_groups):
        assert set((row // 2).tolist()) <= set(kept.tolist())


def test_grouped_float32_with_shared_and_sigmoid_matches_float64_reference():
    layer = routing_layer(
        torch.float32, score_function="sigmoid", num_shared_experts=1, shared_expert_gate=True, gated=True
    )
    assert layer.uses_grouped_layout(torch.float32)
    x = torch.randn(53, 8, dtype=torch.float64, requires_grad=True)
    params = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    ref, ref_aux, _ = reference_moe(params, layer.config, x)
    (ref_grad_x,) = torch.autograd.grad(ref.sum() + ref_aux, x)  # the aux loss flows with the output
    x32 = x.detach().float().requires_grad_()
    out = layer(x32)
    out.sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x32.grad.double(), ref_grad_x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(score_function="tanh"), "score_function"),
        (dict(num_groups=3), "num_groups"),
        (dict(num_groups=4, top_groups=5), "top_groups"),
        (dict(num_groups=4, top_groups=1, top_k=3), "top_k"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(expert_capacity=0), "expert_capacity"),
        (dict(route_scale=float("nan")), "route_scale"),
    ],
)
def test_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(model_dim=8, num_experts=8, hidden_dim=4, **options)


def test_per_call_top_k_respects_groups_and_update_needs_the_option():
    layer = routing_layer(num_groups=4, top_groups=1)
    with pytest.raises(ValueError, match="top_k"):
        layer(torch.randn(3, 8, dtype=torch.float64), top_k=3)
    with pytest.raises(ValueError, match="loss_free_balance"):
        layer.update_load_balance_bias()


def test_loss_free_balance_example_flattens_the_load(tmp_path):
    pytest.importorskip("matplotlib")
    from flexmoe.examples import loss_free_balance

    results = loss_free_balance.main(
        ["--steps", "60", "--batch-tokens", "128", "--update-rate", "0.01", "--plot", str(tmp_path / "load.png")]
    )
    assert results["loss-free"][0] < 0.8 * results["none"][0]
    assert (tmp_path / "load.png").stat().st_size > 0


def _update_on_rank(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        layer = MoELayer(model_dim=4, num_experts=4, hidden_dim=4, loss_free_balance=True, balance_update_rate=0.1)
        layer.load_balancer.record(
            torch.tensor([3.0, 0.0, 0.0, 1.0]) if rank == 0 else torch.tensor([0.0, 0.0, 5.0, 0.0])
        )
        results[rank] = (layer.update_load_balance_bias(dist.group.WORLD), layer.load_balancer.bias.clone())
    finally:
        dist.destroy_process_group()


def test_load_balance_update_sums_loads_over_data_parallel_ranks(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_update_on_rank, args=(str(tmp_path / "init"), results), nprocs=2)
        results = dict(results)
    summed = torch.tensor([3.0, 0.0, 5.0, 1.0])  # mean 2.25
    for rank in (0, 1):
        load, bias = results[rank]
        torch.testing.assert_close(load, summed)
        torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, -0.1, 0.1]))
