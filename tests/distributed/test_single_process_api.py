"""The distributed API's single-process side: configs, choices, expert marking, errors."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from flexmoe import MoELayer, ParallelConfig
from flexmoe.distributed.ddp import mark_experts_for_ddp
from flexmoe.parallel import ExpertLayout, ParallelChoice, expert_parameters, non_expert_parameters
from tests.conftest import make_layer


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(parallel_degree=-1), ValueError, "parallel_degree"),
        (dict(parallel_degree=True), TypeError, "parallel_degree"),
        (dict(overlap_degree=0), ValueError, "overlap_degree"),
        (dict(overlap_degree=1.5), TypeError, "overlap_degree"),
        (dict(a2a_algorithm="ring"), ValueError, "a2a_algorithm must be one of"),
        (dict(local_world_size=0), ValueError, "local_world_size"),
    ],
)
def test_parallel_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        ParallelConfig(**kwargs)


def test_single_process_layer_layout_and_choices():
    layer = make_layer()
    assert layer.layout == ExpertLayout(6, 1, 0)
    assert layer.valid_parallel_choices() == [ParallelChoice(1)]
    with pytest.raises(TypeError, match="parallel must be"):
        MoELayer(model_dim=8, num_experts=2, hidden_dim=4, parallel={"parallel_degree": 1})


def test_single_process_per_call_choices_give_the_same_result():
    layer = make_layer()
    x = torch.randn(10, 8, dtype=torch.float64)
    expected = layer(x)
    # Single-process runs one code path whatever the choice: this guards that valid choices are
    # accepted and stay without effect (the multi-process parity tests check that they agree).
    for kwargs in (dict(parallel_degree=0), dict(parallel_degree=1, overlap_degree=3, a2a_algorithm="linear")):
        torch.testing.assert_close(layer(x, **kwargs), expected, rtol=0, atol=0)
    for kwargs, match in [
        (dict(parallel_degree=2), "single-process"),
        (dict(a2a_algorithm="2dh"), "single-process"),
        (dict(overlap_degree=0), "overlap_degree"),
        (dict(a2a_algorithm="tree"), "a2a_algorithm must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            layer(x, **kwargs)


def test_expert_parameters_are_marked_and_survive_parameter_replacement():
    model = nn.Sequential(nn.Linear(8, 8), make_layer())
    names = [name for name, _ in expert_parameters(model)]
    assert names == ["1.experts.w1", "1.experts.w2", "1.experts.b1", "1.experts.b2"]
    others = {name for name, _ in non_expert_parameters(model)}
    assert others == {"0.weight", "0.bias", "1.router.weight"}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # replaces the parameter objects
    assert [name for name, _ in expert_parameters(copy.deepcopy(model).float())] == names


def test_expert_layout_still_works_and_names_expert_kernel():
    with pytest.warns(DeprecationWarning, match="expert_kernel"):
        layer = MoELayer(model_dim=8, num_experts=2, hidden_dim=4, expert_layout="padded")
    assert layer.config.expert_kernel == "padded"
    x = torch.randn(5, 8)
    assert layer.expert_kernel(x, layer.routing.route(x, x, None, top_k=2, capacity_factor=0.0).plan) == "padded"


def test_replacing_the_config_reaches_the_executor():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(6, 8)
    plan = layer.routing.route(x, x, None, top_k=2, capacity_factor=0.0).plan
    assert layer.expert_kernel(x, plan) == "grouped"
    layer.config = dataclasses.replace(layer.config, expert_kernel="padded")
    assert layer.expert_kernel(x, plan) == "padded"


def test_a_layer_pickled_without_an_executor_loads():
    layer = make_layer()
    state = layer.__getstate__()
    # What the state of a layer pickled before it had an executor holds.
    state["config"], state["tuner"] = state.pop("_config"), None
    del state["executor"]
    clone = MoELayer.__new__(MoELayer)
    clone.__setstate__(state)
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)


class _MarkedLayer(nn.Module):
    """Stands for an expert-parallel layer (which needs a process group to build)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(2, 2)
        self.experts = nn.Linear(2, 2)
        mark_experts_for_ddp(self)


def test_ddp_exclusion_climbs_to_every_module_the_layer_is_built_into():
    ignored = "_ddp_params_and_buffers_to_ignore"
    root = nn.Sequential(nn.Linear(2, 2), nn.ModuleList([_MarkedLayer(), nn.Linear(2, 2)]))
    assert getattr(root, ignored) == ["1.0.experts.bias", "1.0.experts.weight"]
    assert all(param._ddp_ignored for param in root[1][0].experts.parameters())
    # Names set by others stay; a replaced layer's names leave its parent.
    setattr(root[1], ignored, [*getattr(root[1], ignored), "1.weight"])
    root[1][0] = nn.Linear(2, 2)
    assert getattr(root[1], ignored) == ["1.weight"]
    root[1][1] = _MarkedLayer()
    assert getattr(root[1], ignored) == ["1.experts.bias", "1.experts.weight", "1.weight"]
    # A copy keeps the marks.
    assert getattr(copy.deepcopy(root[1]), ignored) == getattr(root[1], ignored)
