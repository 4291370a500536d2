"""RoutingPlan semantics: GShard placement order, capacity, batch-prioritized routing."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmoe import MoELayer
from flexmoe.routing import capacity_bound, expert_capacity, plan_routes


def _scores_from_choices(choices: list[list[int]], num_experts: int) -> torch.Tensor:
    """Scores whose top-k equals the given per-token expert lists, best first."""
    scores = torch.full((len(choices), num_experts), 0.01)
    for t, experts in enumerate(choices):
        for rank, e in enumerate(experts):
            scores[t, e] = 1.0 - 0.1 * rank
    return scores / scores.sum(1, keepdim=True)


def _slots(plan) -> dict[tuple[int, int], tuple[int, int]]:
    return {
        (int(t), int(c)): (int(e), int(s))
        for t, c, e, s in zip(plan.token_index, plan.choice_index, plan.expert_index, plan.slot)
    }


def test_second_choices_come_after_all_first_choices():
    # Token 0: (1, 0); token 1: (0, 1); token 2: (0, 1).
    scores = _scores_from_choices([[1, 0], [0, 1], [0, 1]], num_experts=2)
    plan = plan_routes(scores, top_k=2, capacity_factor=0.0)
    slots = _slots(plan)
    # First choices claim expert 0 in token order (1, 2), then token 0's second choice.
    assert slots[(1, 0)] == (0, 0) and slots[(2, 0)] == (0, 1) and slots[(0, 1)] == (0, 2)
    assert slots[(0, 0)] == (1, 0) and slots[(1, 1)] == (1, 1) and slots[(2, 1)] == (1, 2)
    assert plan.capacity == 3


def test_capacity_drops_latest_claims_and_bpr_keeps_confident_tokens():
    scores = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]])
    first_come = plan_routes(scores, top_k=1, capacity_factor=1.0)  # capacity ceil(4/2) = 2
    assert first_come.capacity == 2
    assert sorted(first_come.token_index.tolist()) == [0, 1]
    prioritized = plan_routes(scores, top_k=1, capacity_factor=1.0, batch_prioritized=True)
    assert sorted(prioritized.token_index.tolist()) == [1, 3]
    assert prioritized.slot[prioritized.token_index == 1].item() == 0  # highest score claims slot 0


def test_capacity_formula():
    loads = torch.tensor([5, 1, 0, 2])
    assert capacity_bound(1.25, 8, 4, 2) == 2 * math.ceil(1.25 * 8 / 4)
    assert expert_capacity(1.25, loads, 8, 2) == 6
    assert expert_capacity(0.0, loads, 8, 2) == 5
    assert expert_capacity(-0.5, loads, 8, 2) == 2
    assert expert_capacity(-4.0, loads, 8, 2) == 5


@settings(max_examples=60, deadline=None)
@given(
    num_tokens=st.integers(0, 40),
    num_experts=st.integers(1, 7),
    k_frac=st.floats(0, 1),
    capacity_factor=st.sampled_from([0.0, 0.3, 1.0, 2.0, -0.7]),
    bpr=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_plan_invariants(num_tokens, num_experts, k_frac, capacity_factor, bpr, seed):
    top_k = 1 + int(k_frac * (num_experts - 1))
    generator = torch.Generator().manual_seed(seed)
    scores = torch.softmax(torch.randn(num_tokens, num_experts, generator=generator), -1)
    plan = plan_routes(scores, top_k, capacity_factor, batch_prioritized=bpr)
    loads = torch.bincount(scores.topk(top_k, 1).indices.reshape(-1), minlength=num_experts)
    assert torch.equal(plan.tokens_per_expert, loads)
    assert torch.equal(plan.kept_per_expert, loads.clamp(max=plan.capacity))
    largest_load = int(loads.max()) if num_tokens else 0
    if capacity_factor == 0:
        assert plan.capacity == largest_load
    elif capacity_factor < 0:
        assert plan.capacity == min(largest_load, capacity_bound(capacity_factor, num_tokens, num_experts, top_k))
    # Entries sorted by expert; within an expert the slots are 0..kept-1.
    for e in range(num_experts):
        slots = plan.slot[plan.expert_index == e]
        assert torch.equal(slots, torch.arange(int(plan.kept_per_expert[e])))
    assert torch.all(plan.expert_index[1:] >= plan.expert_index[:-1])
    # Every entry is a real choice of its token; no (token, choice) pair appears twice.
    chosen = scores.topk(top_k, 1).indices
    assert torch.equal(chosen[plan.token_index, plan.choice_index], plan.expert_index)
    pairs = set(zip(plan.token_index.tolist(), plan.choice_index.tolist()))
    assert len(pairs) == plan.num_kept
    # A dropless factor drops nothing.
    if capacity_factor == 0:
        assert plan.num_kept == num_tokens * top_k


def test_dropless_capacity_is_read_only_when_asked():
    # A grouped dropless step never needs the capacity: reading it (a host sync on CUDA) waits
    # for the first access, for the plan and for the layer's stats alike.
    scores = torch.softmax(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), -1)
    plan = plan_routes(scores, 2, 0.0)
    assert plan._capacity is None
    assert plan.capacity == int(plan.tokens_per_expert.max())
    layer = MoELayer(model_dim=16, num_experts=4, hidden_dim=32, top_k=2, capacity_factor=0.0)
    layer(torch.randn(10, 16))
    assert layer.stats._capacity is None
    assert layer.stats.capacity == int(layer.stats.tokens_per_expert.max())
