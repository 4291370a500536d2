"""The configuration in sections (routing, experts, shared experts) is the flat MoEConfig regrouped."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexmoe import ExpertsConfig, MoEConfig, MoELayer, RoutingConfig, SharedExpertsConfig
from flexmoe.config import SECTIONS, config_from_sections


def test_sections_split_the_flat_config_with_its_defaults():
    flat = {f.name: f for f in dataclasses.fields(MoEConfig)}
    seen: set[str] = set()
    for section in SECTIONS.values():
        for field in dataclasses.fields(section):
            assert field.name in flat, field.name
            assert field.default == flat[field.name].default, field.name
            assert field.name not in seen
            seen.add(field.name)
    assert set(flat) - seen == {"model_dim", "num_experts", "check_finite"}


def test_layer_from_sections_equals_layer_from_flat_options():
    sections = dict(
        routing=RoutingConfig(top_k=1, score_function="sigmoid", route_scale=2.0),
        experts=ExpertsConfig(hidden_dim=12, gated=True, expert_kernel="padded"),
        shared_experts=SharedExpertsConfig(num_shared_experts=1, shared_hidden_dim=4),
    )
    torch.manual_seed(0)
    nested = MoELayer(model_dim=8, num_experts=4, **sections).double()
    torch.manual_seed(0)
    flat = MoELayer(
        model_dim=8,
        num_experts=4,
        top_k=1,
        score_function="sigmoid",
        route_scale=2.0,
        hidden_dim=12,
        gated=True,
        expert_kernel="padded",
        num_shared_experts=1,
        shared_hidden_dim=4,
    ).double()
    assert nested.config == flat.config
    assert nested.config.routing_config == sections["routing"]
    assert nested.config.experts_config == sections["experts"]
    assert nested.config.shared_experts_config == sections["shared_experts"]
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(nested(x), flat(x), rtol=0, atol=0)
    # A section beside a config overrides it, as flat options do.
    base = MoEConfig(model_dim=8, num_experts=4, hidden_dim=12)
    assert MoELayer(base, routing=RoutingConfig(top_k=1)).config.top_k == 1


def test_sections_reject_options_given_twice_and_wrong_types():
    with pytest.raises(ValueError, match="given both flat and in routing"):
        config_from_sections(8, 4, routing=RoutingConfig(top_k=1), top_k=2, hidden_dim=4)
    with pytest.raises(TypeError, match="routing must be a RoutingConfig"):
        MoELayer(model_dim=8, num_experts=4, hidden_dim=4, routing=ExpertsConfig())
    with pytest.raises(ValueError, match="top_k must be"):  # validated when combined
        MoELayer(model_dim=8, num_experts=4, routing=RoutingConfig(top_k=9), experts=ExpertsConfig(hidden_dim=4))


def test_expert_layout_is_taken_at_construction_with_a_warning():
    with pytest.warns(DeprecationWarning, match="expert_kernel"):
        config = MoEConfig(model_dim=8, num_experts=2, expert_layout="per_expert")
    assert config.expert_kernel == "per_expert"
    with pytest.warns(DeprecationWarning, match="expert_kernel"):
        assert dataclasses.replace(config, expert_layout="grouped").expert_kernel == "grouped"
    assert dataclasses.replace(config, top_k=1).expert_kernel == "per_expert"


def test_section_defaults_are_the_flat_config_defaults():
    """The section dataclasses repeat MoEConfig's fields; their defaults must not drift apart."""
    flat = {f.name: f.default for f in dataclasses.fields(MoEConfig)}
    for section in (RoutingConfig, ExpertsConfig, SharedExpertsConfig):
        for field in dataclasses.fields(section):
            if field.name in flat and field.default is not dataclasses.MISSING:
                assert field.default == flat[field.name], (section.__name__, field.name)
