"""Bad input gets a clear error naming the argument."""

import math

import pytest
import torch

from flexmoe import MoEConfig, MoELayer

from .conftest import make_layer


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(top_k=0), "top_k"),
        (dict(top_k=7), "top_k"),
        (dict(capacity_factor=math.nan), "capacity_factor"),
        (dict(capacity_factor=math.inf), "capacity_factor"),
        (dict(router="topk"), "router"),
        (dict(activation="tanh"), "activation"),
        (dict(aux_loss="switch"), "aux_loss"),
        (dict(model_dim=0), "model_dim"),
        (dict(num_experts=-1), "num_experts"),
        (dict(gate_noise=-0.1), "gate_noise"),
        (dict(expert_kernel="dense"), "expert_kernel"),
        (dict(z_loss=math.nan), "z_loss"),
    ],
)
def test_bad_config(options, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{"model_dim": 8, "num_experts": 6, "hidden_dim": 12, **options})


def test_unknown_option_and_wrong_types():
    with pytest.raises(TypeError, match="capacity"):
        MoELayer(model_dim=8, num_experts=4, hidden_dim=8, capacity=2)
    with pytest.raises(TypeError, match="capacity_factor"):
        MoEConfig(model_dim=8, num_experts=4, capacity_factor="1.0")
    with pytest.raises(TypeError, match="normalize_gate"):
        MoEConfig(model_dim=8, num_experts=4, normalize_gate=1)
    with pytest.raises(ValueError, match="hidden_dim"):
        MoELayer(model_dim=8, num_experts=4)


def test_bad_forward_input():
    layer = make_layer(torch.float32)
    with pytest.raises(ValueError, match="model_dim=8"):
        layer(torch.randn(4, 7))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="top_k"):
        layer(torch.randn(4, 8), top_k=7)
    with pytest.raises(ValueError, match="capacity_factor"):
        layer(torch.randn(4, 8), capacity_factor=math.nan)


def test_check_finite_option():
    x = torch.randn(4, 8)
    x[1, 2] = math.nan
    make_layer(torch.float32)(x)  # off by default: no sync, no error
    with pytest.raises(ValueError, match="NaN or inf"):
        make_layer(torch.float32, check_finite=True)(x)


def test_custom_experts_with_wrong_shape():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return x[:, :, :4]

    layer = MoELayer(model_dim=8, num_experts=4, experts=Bad())
    with pytest.raises(ValueError, match="same shape"):
        layer(torch.randn(5, 8))
    with pytest.raises(ValueError, match="forward_grouped"):
        MoELayer(model_dim=8, num_experts=4, experts=Bad(), expert_kernel="grouped")


def test_grouped_layout_refuses_float64():
    layer = make_layer(expert_kernel="grouped")
    with pytest.raises(ValueError, match="expert_kernel"):
        layer(torch.randn(4, 8, dtype=torch.float64))
