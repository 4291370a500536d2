"""Token / sentence / task routing against the reference, and their input checks."""

import pytest
import torch

from flexmoe.reference import reference_moe

from .conftest import make_layer, params_of


def _padding(batch=4, seq=7):
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[1, 4:] = True
    mask[2, 1:] = True
    mask[3, :] = True  # an all-padding sequence
    return mask


def _compare(layer, x, **inputs):
    x_ = x.clone().requires_grad_()
    out = layer(x_, **inputs)
    upstream = torch.randn_like(out)
    out.backward(upstream)  # the aux loss's gradient flows through the output
    params = params_of(layer)
    layer_grads = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    xr = x.clone().requires_grad_()
    ref_params = {n: p.detach() for n, p in params.items()}
    ref, ref_aux, ref_cap = reference_moe(ref_params, layer.config, xr, **inputs)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.aux_loss, ref_aux, rtol=1e-10, atol=1e-12)
    assert layer.stats.capacity == ref_cap
    outputs = [(ref, upstream)] + ([(ref_aux, torch.ones(()))] if ref_aux.requires_grad else [])
    ref_outputs, ref_upstream = zip(*outputs)
    ref_x_grad = torch.autograd.grad(ref_outputs, [xr], ref_upstream)[0]
    torch.testing.assert_close(x_.grad, ref_x_grad, rtol=1e-9, atol=1e-11)
    return out, layer_grads


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
@pytest.mark.parametrize("with_mask", [False, True])
def test_sentence_routing_matches_reference(capacity_factor, with_mask):
    layer = make_layer(granularity="sentence", capacity_factor=capacity_factor, top_k=2)
    x = torch.randn(4, 7, 8, dtype=torch.float64)
    mask = _padding() if with_mask else None
    out, _ = _compare(layer, x, padding_mask=mask)
    assert layer.stats.num_tokens == (int((~mask).sum()) if with_mask else 28)
    if with_mask:
        assert torch.all(out[mask] == 0)


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_sentence_inputs_route_each_sequence(capacity_factor):
    """A sentence-routed layer given ``sentence_inputs`` routes sequence b by row b (a decoder
    routing by its source sentence), against the reference; the sentence mean is not used."""
    layer = make_layer(granularity="sentence", capacity_factor=capacity_factor)
    x = torch.randn(4, 7, 8, dtype=torch.float64)
    inputs = torch.randn(4, 8, dtype=torch.float64)
    out, _ = _compare(layer, x, padding_mask=_padding(), sentence_inputs=inputs)
    assert not torch.allclose(out, layer(x, padding_mask=_padding()))  # not the mean's routing
    with pytest.raises(ValueError, match="sentence_inputs must have shape"):
        layer(x, sentence_inputs=inputs[:3])


@pytest.mark.parametrize("per_token_ids", [False, True])
def test_task_routing_matches_reference(per_token_ids):
    layer = make_layer(granularity="task", num_tasks=5, task_embedding_dim=6, top_k=2, z_loss=0.01)
    x = torch.randn(4, 7, 8, dtype=torch.float64)
    task_ids = torch.tensor([3, 0, 3, 4])
    if per_token_ids:
        task_ids = torch.randint(5, (4, 7))
    _, grads = _compare(layer, x, task_ids=task_ids, padding_mask=_padding())
    assert grads["task_embedding.weight"].abs().sum() > 0
    assert layer.router.weight.shape == (6, 6)  # [num_experts, task_embedding_dim]


def test_all_tokens_of_a_task_share_experts_and_gates():
    layer = make_layer(granularity="task", num_tasks=3)
    x = torch.randn(6, 5, 8, dtype=torch.float64)
    task_ids = torch.tensor([0, 1, 0, 2, 1, 0])
    layer(x, task_ids=task_ids)
    plan_experts = layer.stats.tokens_per_expert
    # 3 tasks x top-2 experts: at most 6 experts used, each by whole tasks' token counts.
    assert set(plan_experts.tolist()) <= {0, 5, 10, 15, 20, 25, 30}


def test_token_layer_skips_padding_and_ignores_task_ids():
    layer = make_layer(capacity_factor=1.0)
    x = torch.randn(4, 7, 8, dtype=torch.float64)
    _compare(layer, x, padding_mask=_padding(), task_ids=torch.zeros(4, dtype=torch.long))
    assert layer.stats.num_tokens == int((~_padding()).sum())


def test_granularity_input_errors():
    task_layer = make_layer(granularity="task", num_tasks=3)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="task_ids is required"):
        task_layer(x)
    with pytest.raises(ValueError, match=r"0\.\.num_tasks-1"):
        task_layer(x, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="task_ids must have shape"):
        task_layer(x, task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        task_layer(x, task_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        task_layer(x, task_ids=torch.tensor([0, 1]), padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask"):
        task_layer(x, task_ids=torch.tensor([0, 1]), padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="sentence"):
        make_layer(granularity="sentence")(torch.randn(10, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_tasks"):
        make_layer(granularity="task")
