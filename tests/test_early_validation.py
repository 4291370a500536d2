"""Options that would fail deep inside a forward are refused at construction, naming the option,
the accepted values and the fix."""

from __future__ import annotations

import pytest
import torch

from flexmoe import MoEConfig, MoELayer

BASE = dict(model_dim=8, num_experts=4, hidden_dim=12)


@pytest.mark.parametrize("factor", [1e300, -1e300, 16.5, -17])
def test_capacity_factor_far_beyond_num_experts_is_refused_at_construction(factor):
    with pytest.raises(ValueError, match=r"capacity_factor must be in -16..16 .*num_experts \(4\).*use 0 .*got"):
        MoEConfig(**BASE, capacity_factor=factor)


def test_capacity_factor_per_call_is_bounded_alike():
    layer = MoELayer(**BASE)
    with pytest.raises(ValueError, match=r"capacity_factor must be in -16..16"):
        layer(torch.randn(3, 8), capacity_factor=1e300)
    # The largest accepted factor (padding studies go beyond num_experts, where every choice fits).
    assert layer(torch.randn(3, 8), capacity_factor=16.0).shape == (3, 8)
    assert MoEConfig(**BASE, capacity_factor=-16.0).capacity_factor == -16.0


@pytest.mark.parametrize(
    "activation",
    [lambda t: t[..., :2], lambda t: t.sum(), lambda t: t.unsqueeze(0), lambda t: t.tolist()],
    ids=["narrower", "scalar", "extra_dim", "not_a_tensor"],
)
def test_activation_that_changes_the_shape_is_refused_at_construction(activation):
    with pytest.raises(ValueError, match=r"activation must be elementwise .*torch.nn.functional.silu"):
        MoEConfig(**BASE, activation=activation)
    with pytest.raises(ValueError, match="activation must be elementwise"):
        MoELayer(**BASE, activation=activation)


def test_activation_that_raises_is_named_at_construction():
    def broken(t):
        raise RuntimeError("boom")

    with pytest.raises(ValueError, match="activation raised RuntimeError: boom"):
        MoEConfig(**BASE, activation=broken)


def test_elementwise_callables_are_accepted():
    for activation in (torch.tanh, torch.nn.GELU(), lambda t: t * torch.sigmoid(t)):
        layer = MoELayer(**BASE, activation=activation)
        assert layer(torch.randn(3, 8)).shape == (3, 8)


def test_zero_route_scale_is_refused():
    # Every gate times 0: the layer would output zeros and its router would learn nothing.
    with pytest.raises(ValueError, match=r"route_scale must be finite and > 0 .*got 0.0"):
        MoEConfig(**BASE, route_scale=0.0)
