"""The balance loss reaches the router through the layer output: without being added, under
reentrant activation checkpointing, and once only for code that still adds layer.aux_loss."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from flexmoe.reference import reference_moe
from tests.conftest import make_layer, params_of


def _reference_router_grad(layer, x, upstream):
    params = {name: p.detach().requires_grad_() for name, p in params_of(layer).items()}
    out, aux, _ = reference_moe(params, layer.config, x)
    torch.autograd.backward([out, aux], [upstream, torch.ones_like(aux)])
    return params["router.weight"].grad


@pytest.mark.parametrize("use_reentrant", [True, False, None])
def test_router_gradient_includes_aux_loss(use_reentrant):
    torch.manual_seed(0)
    layer = make_layer(aux_loss="gshard", aux_loss_weight=1.0, z_loss=0.1).train()
    x = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(30, 8, dtype=torch.float64)
    if use_reentrant is None:
        out = layer(x)
    else:
        out = checkpoint(layer, x, use_reentrant=use_reentrant)
    out.backward(upstream)
    expected = _reference_router_grad(layer, x.detach(), upstream)
    torch.testing.assert_close(layer.router.weight.grad, expected, rtol=1e-9, atol=1e-12)
    assert float(layer.aux_loss) > 0 and not layer.aux_loss.requires_grad  # readable for logging


def test_adding_aux_loss_does_not_count_it_twice():
    torch.manual_seed(0)
    layer = make_layer(aux_loss="gshard", aux_loss_weight=1.0).train()
    x = torch.randn(30, 8, dtype=torch.float64)
    upstream = torch.randn(30, 8, dtype=torch.float64)
    out = layer(x)
    (torch.sum(out * upstream) + layer.aux_loss).backward()
    torch.testing.assert_close(layer.router.weight.grad, _reference_router_grad(layer, x, upstream))


def test_opting_out_keeps_the_graph_on_aux_loss():
    torch.manual_seed(0)
    layer = make_layer(aux_loss="gshard", aux_loss_weight=1.0, aux_loss_in_backward=False).train()
    x = torch.randn(30, 8, dtype=torch.float64)
    upstream = torch.randn(30, 8, dtype=torch.float64)
    out = layer(x)
    assert layer.aux_loss.requires_grad
    torch.autograd.backward([out, layer.aux_loss], [upstream, torch.ones(())])
    torch.testing.assert_close(layer.router.weight.grad, _reference_router_grad(layer, x, upstream))


def test_aux_loss_in_backward_must_be_bool():
    with pytest.raises(TypeError, match="aux_loss_in_backward"):
        make_layer(aux_loss_in_backward="yes")
