"""Expert capacity: how many (token, choice) slots each expert accepts in one step."""

from __future__ import annotations

import math

import torch


def capacity_bound(capacity_factor: float, num_tokens: int, num_experts: int, top_k: int) -> int:
    """``top_k * ceil(|capacity_factor| * num_tokens / num_experts)``: the fixed capacity a factor gives."""
    return top_k * math.ceil(abs(capacity_factor) * num_tokens / num_experts)


def expert_capacity(capacity_factor: float, tokens_per_expert: torch.Tensor, num_tokens: int, top_k: int) -> int:
    """Capacity per expert for this step.

    capacity_factor > 0: the fixed bound; == 0: dropless, the largest load of any expert
    (``tokens_per_expert.max()``); < 0: dropless, capped at the bound ``|capacity_factor|`` gives.
    ``tokens_per_expert``: [num_experts] number of (token, choice) pairs routed to each expert.
    """
    num_experts = tokens_per_expert.numel()
    if capacity_factor > 0:
        return capacity_bound(capacity_factor, num_tokens, num_experts, top_k)
    largest_load = int(tokens_per_expert.max()) if num_tokens > 0 else 0
    if capacity_factor == 0:
        return largest_load
    return min(largest_load, capacity_bound(capacity_factor, num_tokens, num_experts, top_k))
