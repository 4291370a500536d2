"""RoutingStats: the router entropy is computed on first read and equals the plain formula."""

import math

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
