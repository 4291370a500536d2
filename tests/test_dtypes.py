"""Half precision, autocast and the no-dense-one-hot guarantee."""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .conftest import make_layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_grouped_and_padded_agree_with_float32(dtype):
    layer32 = make_layer(torch.float32, capacity_factor=1.0, hidden_dim=16)
    layer = make_layer(torch.float32, capacity_factor=1.0, hidden_dim=16)
    layer.load_state_dict(layer32.state_dict())
    layer = layer.to(dtype)
    x = torch.randn(64, 8)
    expected = layer32(x.to(dtype).float())
    for layout in ("grouped", "padded"):
        layer.config = dataclasses.replace(layer.config, expert_kernel=layout)
        x_ = x.to(dtype).requires_grad_()
        out = layer(x_)
        assert out.dtype == dtype
        out.float().sum().backward()
        assert x_.grad.dtype == dtype and layer.router.weight.grad is not None
        torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


def test_autocast_keeps_router_in_float32():
    layer = make_layer(torch.float32, capacity_factor=1.0)
    x = torch.randn(32, 8, requires_grad=True)
    seen = {}

    def record(module, inputs, logits):
        seen["logits"] = logits.dtype

    layer.router.register_forward_hook(record)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert seen["logits"] == torch.float32
    assert out.dtype == torch.bfloat16
    (out.float().sum() + layer.aux_loss).backward()
    assert layer.experts.w1.grad.dtype == torch.float32
    # Same routing as float32 (the router never saw bfloat16), outputs close.
    torch.testing.assert_close(out.float(), layer(x), rtol=5e-2, atol=5e-2)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("layout", ["grouped", "padded"])
def test_no_tokens_by_experts_by_capacity_tensor(layout):
    """Dispatch is O(tokens * k * dim): no op produces anything near [tokens, experts, capacity]."""
    tokens, experts, dim = 2048, 64, 4
    layer = make_layer(
        torch.float32, model_dim=dim, hidden_dim=4, num_experts=experts, capacity_factor=2.0, expert_kernel=layout
    )
    x = torch.randn(tokens, dim, requires_grad=True)
    with _LargestTensor() as probe:
        out = layer(x)
        out.backward(torch.randn_like(out))
    capacity = layer.stats.capacity
    assert tokens * experts * capacity > 100 * probe.largest
    assert probe.largest <= max(tokens * experts, experts * capacity * dim, tokens * 2 * dim)
