"""Loss-free load balancing (Wang et al. 2024; DeepSeek-V3): a per-expert selection bias.

The bias is added to the routing scores for the top-k *choice* only, never to the gate
weights, so it steers load without changing what a chosen expert's output is weighted by and
without a gradient or an auxiliary loss. After each optimizer step the training loop calls
``update()``: ``bias += rate * sign(mean_load - load_e)`` with the loads counted since the
previous update (all forwards of the step: micro-batches, several calls), so overloaded
experts become less attractive and idle ones more.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class LoadBalanceBias(nn.Module):
    """Holds ``bias`` [num_experts] (a buffer saved in the state dict) and the loads counted
    since the last update (``pending_load``, a buffer not saved)."""

    def __init__(self, num_experts: int, update_rate: float) -> None:
        super().__init__()
        self.update_rate = update_rate
        self.register_buffer("bias", torch.zeros(num_experts))
        self.register_buffer("pending_load", torch.zeros(num_experts), persistent=False)
        # pending_load is not in the state dict: a load must not leave it stale (or uninitialised
        # after building on the meta device and ``to_empty``).
        self.register_load_state_dict_post_hook(_clear_pending_load)

    def reset_parameters(self) -> None:
        """Zero bias and no recorded load (the state of a new balancer)."""
        with torch.no_grad():
            self.bias.zero_()
            self.pending_load.zero_()

    def extra_repr(self) -> str:
        return f"num_experts={self.bias.numel()}, update_rate={self.update_rate}"

    @torch.no_grad()
    def record(self, tokens_per_expert: torch.Tensor) -> None:
        """tokens_per_expert: [num_experts] (token, choice) pairs routed to each expert in one forward."""
        self.pending_load += tokens_per_expert.to(self.pending_load.dtype)

    @torch.no_grad()
    def update(self, process_group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """Apply ``bias += rate * sign(mean_load - load_e)`` from the recorded loads and reset them.

        process_group: sum the loads over its ranks first (data parallelism), so every rank
        applies the same update and the biases stay identical. Returns the loads used,
        [num_experts]. No recorded load (all zero): the bias is unchanged.
        """
        load = self.pending_load.clone()
        if process_group is not None:
            dist.all_reduce(load, group=process_group)
        self.bias += self.update_rate * torch.sign(load.mean() - load).to(self.bias.dtype)
        self.pending_load.zero_()
        return load


def _clear_pending_load(module: LoadBalanceBias, incompatible_keys: object) -> None:
    with torch.no_grad():
        module.pending_load.zero_()
