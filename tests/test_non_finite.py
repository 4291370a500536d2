"""A NaN or inf in one token (``check_finite=False``): the router's auxiliary losses leave that
token out, so the other tokens' gradients are those of a batch without it (float64), and the
layer's stats count it (no host read in the forward)."""

from __future__ import annotations

import pytest
import torch

from flexmoe import MoELayer

BAD_ROW = 3


def _layer(aux_loss: str, in_backward: bool) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(
        model_dim=6,
        hidden_dim=8,
        num_experts=4,
        top_k=2,
        capacity_factor=0.0,  # dropless: a token's output does not depend on the others
        aux_loss=aux_loss,
        aux_loss_weight=0.5,
        z_loss=0.1,
        gate_noise=0.0,
        aux_loss_in_backward=in_backward,
    )
    return layer.double()


def _finite_grads(layer: MoELayer, x: torch.Tensor, keep: torch.Tensor, upstream: torch.Tensor):
    """(aux loss, input grad of the kept rows) of ``(out[keep] * upstream).sum() (+ aux)``."""
    x = x.clone().requires_grad_(True)
    out = layer(x)
    loss = (out[keep] * upstream).sum()
    if not layer.config.aux_loss_in_backward:
        loss = loss + layer.aux_loss
    loss.backward()
    return layer.aux_loss.detach(), x.grad[keep]


@pytest.mark.parametrize("aux_loss", ["gshard", "load_importance"])
@pytest.mark.parametrize("in_backward", [True, False])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_a_non_finite_token_is_left_out_of_the_router_losses(aux_loss, in_backward, bad_value):
    torch.manual_seed(1)
    x = torch.randn(7, 6, dtype=torch.float64)
    x[BAD_ROW, 2] = bad_value
    finite = torch.arange(7) != BAD_ROW
    upstream = torch.randn(6, 6, dtype=torch.float64)
    layer = _layer(aux_loss, in_backward)
    aux, grad = _finite_grads(layer, x, finite, upstream)
    assert int(layer.stats.non_finite_units) == 1
    reference_aux, reference_grad = _finite_grads(_layer(aux_loss, in_backward), x[finite], slice(None), upstream)
    assert torch.isfinite(aux)
    torch.testing.assert_close(aux, reference_aux, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-12, atol=1e-14)


def test_finite_batches_count_none():
    layer = _layer("gshard", True)
    layer(torch.randn(5, 6, dtype=torch.float64))
    assert torch.isfinite(layer.aux_loss) and int(layer.stats.non_finite_units) == 0
