"""Meta-device construction: to_empty + reset_parameters gives the eager initialisation; loading a
state dict leaves no stale running buffer."""

import pytest
import torch

from flexmoe import MoELayer

OPTIONS = dict(
    model_dim=64,
    num_experts=8,
    hidden_dim=96,
    gated=True,
    loss_free_balance=True,
    num_shared_experts=1,
    shared_expert_gate=True,
)


def _meta_then_reset(**options) -> MoELayer:
    with torch.device("meta"):
        layer = MoELayer(**options)
    layer.to_empty(device="cpu")
    for module in layer.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return layer


@pytest.mark.parametrize("router", ["linear", "cosine"])
def test_meta_init_matches_eager_distributions(router):
    options = dict(OPTIONS, router=router, cosine_proj_dim=32)
    torch.manual_seed(0)
    eager = MoELayer(**options)
    torch.manual_seed(1)
    rebuilt = _meta_then_reset(**options)
    eager_state, rebuilt_state = eager.state_dict(), rebuilt.state_dict()
    assert eager_state.keys() == rebuilt_state.keys()
    for name, expected in eager_state.items():
        got = rebuilt_state[name]
        if expected.numel() < 16 or float(expected.std()) == 0:  # deterministic: exact
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)
            continue
        # Random: same law (a wrong scale, like uninitialised memory, is off by orders of magnitude).
        standard_error = float(expected.std()) / expected.numel() ** 0.5
        torch.testing.assert_close(got.std(), expected.std(), rtol=0.2, atol=0, msg=name)
        assert abs(float(got.mean())) < 5 * standard_error, name
        assert float(got.abs().max()) <= 1.5 * float(expected.abs().max()), name
    assert not rebuilt.load_balancer.pending_load.any()


def test_task_embedding_reset_after_meta():
    options = dict(model_dim=32, num_experts=4, hidden_dim=32, granularity="task", num_tasks=64)
    layer = _meta_then_reset(**options)
    torch.testing.assert_close(layer.task_embedding.weight.std(), torch.tensor(1.0), rtol=0.1, atol=0)


def test_load_state_dict_clears_pending_load():
    layer = MoELayer(**OPTIONS)
    layer.train()
    layer(torch.randn(16, 64))
    assert layer.load_balancer.pending_load.sum() > 0
    layer.load_state_dict(MoELayer(**OPTIONS).state_dict())
    assert not layer.load_balancer.pending_load.any()
