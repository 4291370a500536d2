"""Routing telemetry recorded by every MoE forward."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flexmoe.routing.capacity import expert_capacity
from flexmoe.routing.losses import router_entropy


@dataclass
class RoutingStats:
    """What the router did in the last forward. Tensors are detached; reading them as
    Python numbers (``int(stats.dropped)``) synchronises with the device.

    tokens_per_expert: [num_experts] (token, choice) pairs routed to each expert before the cut.
    kept_per_expert:   [num_experts] pairs each expert accepted.
    dropped: pairs dropped by the capacity limit (0 when dropless; computed on read).
    capacity: slots per expert (dropless: the largest load, read on first access).
    num_tokens: tokens routed. top_k: choices per token.
    routing_scores: [num_tokens, num_experts] the router's scores (detached), kept so that
        ``router_entropy`` is computed only when read.
    router_entropy: mean entropy of the routing distribution (nats; log(num_experts) = uniform),
        computed on first access.
    non_finite_units: routing units whose scores are not finite (computed on read).
    """

    tokens_per_expert: torch.Tensor
    kept_per_expert: torch.Tensor
    num_tokens: int
    top_k: int
    routing_scores: torch.Tensor = field(repr=False)
    _capacity: int | None = field(default=None, repr=False)  # None: dropless, the largest load
    _router_entropy: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def capacity(self) -> int:
        """Slots per expert this step."""
        if self._capacity is None:
            self._capacity = expert_capacity(0.0, self.tokens_per_expert, self.num_tokens, self.top_k)
        return self._capacity

    @property
    def non_finite_units(self) -> torch.Tensor:
        """Scalar count of the routing units (tokens; sentences or tasks when routed so) whose
        scores hold a NaN or inf, computed on read. The balance and z losses leave them out."""
        return (~torch.isfinite(self.routing_scores).all(dim=1)).sum()

    @property
    def dropped(self) -> torch.Tensor:
        """Scalar count of the (token, choice) pairs dropped by the capacity limit (computed on read)."""
        return self.num_tokens * self.top_k - self.kept_per_expert.sum()

    @property
    def router_entropy(self) -> torch.Tensor:
        """Scalar mean routing entropy in nats (0 for an empty batch)."""
        if self._router_entropy is None:
            scores = self.routing_scores
            with torch.no_grad():
                self._router_entropy = router_entropy(scores) if scores.shape[0] else scores.new_zeros(())
        return self._router_entropy

    @property
    def dropped_fraction(self) -> float:
        """Share of the ``num_tokens * top_k`` choices dropped (0.0 for an empty batch)."""
        total = self.num_tokens * self.top_k
        return float(self.dropped) / total if total else 0.0

    @property
    def capacity_used(self) -> float:
        """Share of the ``num_experts * capacity`` slots holding a token."""
        slots = self.capacity * self.tokens_per_expert.numel()
        return float(self.kept_per_expert.sum()) / slots if slots else 0.0
