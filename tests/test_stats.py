"""Telemetry computed on first read: RoutingStats.router_entropy, and layer.aux_loss after a
forward without grad; both equal what an eager computation gives."""

import math

import pytest
import torch

from flexmoe import MoELayer


def test_router_entropy_matches_plain_formula_and_is_computed_when_read():
    torch.manual_seed(0)
    layer = MoELayer(model_dim=16, num_experts=6, hidden_dim=32, top_k=2).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    layer(x)
    stats = layer.stats
    assert stats._router_entropy is None  # nothing computed until read
    probs = torch.softmax(x.reshape(-1, 16) @ layer.router.weight.T, dim=-1)
    expected = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(stats.router_entropy, expected)
    assert stats.router_entropy is stats.router_entropy  # cached
    assert 0 < float(stats.router_entropy) < math.log(6)


def test_router_entropy_of_empty_batch_is_zero():
    layer = MoELayer(model_dim=8, num_experts=4, hidden_dim=16)
    layer(torch.randn(0, 8))
    assert float(layer.stats.router_entropy) == 0.0 and layer.stats.num_tokens == 0


@pytest.mark.parametrize("aux_loss", ["gshard", "load_importance"])
def test_aux_loss_after_no_grad_forward_equals_eager_value(aux_loss):
    torch.manual_seed(1)
    layer = MoELayer(
        model_dim=16, num_experts=6, hidden_dim=32, top_k=2, aux_loss=aux_loss, z_loss=0.01, aux_loss_in_backward=False
    ).double()
    layer.eval()
    x = torch.randn(20, 16, dtype=torch.float64)
    layer(x)
    eager = layer.aux_loss.detach()
    assert layer.aux_loss.requires_grad
    with torch.no_grad():
        layer(x)
    assert layer._pending_aux_loss is not None  # deferred until read
    torch.testing.assert_close(layer.aux_loss, eager, rtol=0, atol=0)
    assert float(eager) > 0 and not layer.aux_loss.requires_grad
    layer(x[:0].requires_grad_())  # a later forward replaces a deferred value
    assert float(layer.aux_loss) == 0.0
