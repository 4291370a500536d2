"""torch.func.grad through the layer (dispatch, combine, the per-expert kernel, the aux-loss attach)
equals autograd."""

import pytest
import torch
from torch.func import functional_call, grad

from flexmoe import MoELayer


@pytest.mark.parametrize(
    "kernel,dtype", [("padded", torch.float64), ("per_expert", torch.float64), ("grouped", torch.float32)]
)
def test_func_grad_matches_autograd(kernel, dtype):
    torch.manual_seed(0)
    layer = MoELayer(
        model_dim=16, num_experts=4, hidden_dim=32, gated=True, expert_kernel=kernel, capacity_factor=1.0, z_loss=0.1
    ).to(dtype)
    layer.train()
    x = torch.randn(24, 16, dtype=dtype)

    def loss(params, x):
        return functional_call(layer, params, (x,)).square().sum()

    params = {name: p.detach() for name, p in layer.named_parameters()}
    param_grads, x_grad = grad(loss, argnums=(0, 1))(params, x)
    x_ = x.clone().requires_grad_()
    loss(dict(layer.named_parameters()), x_).backward()
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(x_grad, x_.grad, **tol)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(param_grads[name], p.grad, **tol, msg=name)
