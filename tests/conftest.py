import pytest
import torch

from flexmoe import MoELayer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def make_layer(dtype=torch.float64, **options) -> MoELayer:
    """A small eval-mode layer with non-zero biases (zeros would hide bias bugs)."""
    defaults = dict(model_dim=8, num_experts=6, hidden_dim=12)
    defaults.update(options)
    layer = MoELayer(**defaults).to(dtype).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("experts.b"):
                p.normal_(std=0.1)
    return layer


def params_of(layer: MoELayer, dtype=None) -> dict[str, torch.Tensor]:
    return {n: (p if dtype is None else p.to(dtype)) for n, p in layer.named_parameters()}


def grads(tensors) -> list[torch.Tensor]:
    return [t.grad.clone() if t.grad is not None else None for t in tensors]
