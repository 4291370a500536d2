"""Expert capacity: how many (token, choice) slots each expert accepts in one step."""

from __future__ import annotations

import math

import torch


def count_per_expert(expert_ids: torch.Tensor, num_experts: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """expert_ids: [n] ints in ``[0, num_experts)`` -> [num_experts] how many entries name each expert.

    ``bincount(minlength=num_experts)`` without its data-dependent output size (which breaks
    ``torch.compile`` graphs): a scatter-add into a fixed-size tensor.
    """
    counts = torch.zeros(num_experts, dtype=dtype, device=expert_ids.device)
    return counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids, dtype=dtype))


def capacity_bound(capacity_factor: float, num_tokens: int, num_experts: int, top_k: int) -> int:
    """``top_k * ceil(|capacity_factor| * num_tokens / num_experts)``: the fixed capacity a factor gives."""
    # Under torch.compile a factor that differs between two compiled layers becomes a symbolic
    # float, which shapes cannot depend on; taking its exact ratio fixes it to its value (a guard).
    numerator, denominator = float(capacity_factor).as_integer_ratio()
    factor = abs(numerator / denominator)  # == |capacity_factor|, as a plain float
    return top_k * math.ceil(factor * num_tokens / num_experts)


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
