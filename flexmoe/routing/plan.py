"""Token -> (expert, slot) assignment: the RoutingPlan every later step consumes.

Placement semantics (GShard convention):
  * all first choices of the batch are placed before any second choice, and so on;
  * within one choice rank, tokens are placed in input order, or, with batch-prioritized
    routing, in descending order of their top-1 router score (ties keep input order);
  * an expert accepts ``capacity`` slots; a choice whose slot would be ``>= capacity`` is
    dropped and contributes zero to the output (the residual connection carries the token).

The plan is computed with one stable sort of the ``tokens * top_k`` expert ids, so its cost
is O(tokens * k * log), independent of the number of experts and of the capacity.

A fixed-capacity plan drops a data-dependent number of entries. Eager plans hold the kept ones
only; under ``torch.compile`` (or with ``static_shapes=True``) the plan keeps all
``tokens * top_k`` entries, the kept ones first, and marks the dropped ones (``kept``), so that
every shape is known from the input's: the compiled step needs no host read and no graph break.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from flexmoe.routing.capacity import count_per_expert, expert_capacity
from flexmoe.routing.scores import select_experts


@dataclass
class RoutingPlan:
    """Where each kept (token, choice) pair goes; entries sorted by expert, then slot.

    token_index:  [kept] source token of each entry (int64).
    expert_index: [kept] destination expert.
    gates:        [kept] gate weight applied at combine (float32, differentiable).
    tokens_per_expert: [num_experts] pairs routed to each expert before the capacity cut.
    kept_per_expert:   [num_experts] pairs each expert accepted (``min(load, capacity)``).
    capacity: slots per expert this step (dropless: the largest load, read from the device on
        first use, so a grouped dropless step needs no host sync for it). num_tokens: tokens routed.
    slot:         [kept] position inside the expert's buffer, ``< capacity`` (computed on first
                  use: the grouped layout never needs it).
    choice_index: [kept] which of the token's top-k choices it is (0 = best; on first use).
    kept: None when every entry is kept (the eager form). A static-shape plan: [tokens * top_k]
        bool, True for the first ``sum(kept_per_expert)`` entries; every field above then has
        ``tokens * top_k`` entries, the dropped ones after the kept ones with gate 0 (their slot is
        ``>= capacity``). Executors run it as it is; :meth:`compact` gives the eager form.
    """

    token_index: torch.Tensor
    expert_index: torch.Tensor
    gates: torch.Tensor
    tokens_per_expert: torch.Tensor
    kept_per_expert: torch.Tensor
    num_tokens: int
    claim_index: torch.Tensor = field(repr=False)  # [kept] position of each entry in the choice-major claims
    _capacity: int | None = field(default=None, repr=False)  # None: dropless, the largest load
    _slot: torch.Tensor | None = field(default=None, repr=False)
    kept: torch.Tensor | None = field(default=None, repr=False)

    @property
    def capacity(self) -> int:
        if self._capacity is None:
            self._capacity = expert_capacity(0.0, self.tokens_per_expert, self.num_tokens, 1)
        return self._capacity

    @capacity.setter
    def capacity(self, capacity: int) -> None:
        self._capacity = capacity

    @property
    def has_capacity(self) -> bool:
        """Whether :attr:`capacity` is known without reading the counts (fixed, or already read)."""
        return self._capacity is not None

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.numel()

    @property
    def num_entries(self) -> int:
        """Entries in the plan's tensors: the kept ones, plus the dropped ones in a static-shape plan."""
        return self.token_index.numel()

    @property
    def num_kept(self) -> int:
        """Kept (token, choice) pairs (a host read for a static-shape plan)."""
        return self.num_entries if self.kept is None else int(self.kept.sum())

    @property
    def slot(self) -> torch.Tensor:
        if self._slot is None:  # kept entries are each expert's first ones: slot = rank within the expert
            self._slot = rank_within_expert(self.expert_index, self.kept_per_expert)
        return self._slot

    @property
    def choice_index(self) -> torch.Tensor:
        return self.claim_index // self.num_tokens if self.num_tokens else self.claim_index

    def padded_rows(self) -> torch.Tensor:
        """[entries] row of each entry in the flattened ``[num_experts * capacity, dim]`` buffer;
        a dropped entry of a static-shape plan gets row ``num_experts * capacity``, one past the end."""
        rows = self.expert_index * self.capacity + self.slot
        if self.kept is None:
            return rows
        return torch.where(self.kept, rows, self.num_experts * self.capacity)

    def compact(self) -> RoutingPlan:
        """This plan with the kept entries only (itself when it has no dropped entries)."""
        if self.kept is None:
            return self
        n = self.num_kept
        return replace(
            self,
            token_index=self.token_index[:n],
            expert_index=self.expert_index[:n],
            gates=self.gates[:n],
            claim_index=self.claim_index[:n],
            _slot=self.slot[:n],
            kept=None,
        )


def rank_within_expert(sorted_expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[n] position of each entry among its expert's entries; ``sorted_expert`` is sorted, expert
    e has ``counts[e]`` entries."""
    group_start = torch.cumsum(counts, 0) - counts
    return torch.arange(sorted_expert.numel(), device=sorted_expert.device) - group_start[sorted_expert]


def top_k_gates(
    scores: torch.Tensor,
    top_k: int,
    normalize_gate: bool,
    *,
    selection_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    top_groups: int | None = None,
    route_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores: [tokens, experts] -> (gates [tokens, k], experts [tokens, k]), best choice first.

    The choice is made on ``scores + selection_bias`` within each token's ``top_groups`` best
    groups (see :func:`flexmoe.routing.scores.select_experts`); the gates are the unbiased
    scores of the chosen experts. With ``normalize_gate`` the k gate weights of a token are
    rescaled to sum to 1; then they are multiplied by ``route_scale``.
    """
    if selection_bias is None and num_groups == 1:
        gates, experts = scores.topk(top_k, dim=1)
    else:
        experts = select_experts(
            scores, top_k, selection_bias=selection_bias, num_groups=num_groups, top_groups=top_groups
        )
        gates = scores.gather(1, experts)
    if normalize_gate:
        gates = gates / gates.sum(dim=1, keepdim=True).clamp_min(torch.finfo(gates.dtype).eps)
    if route_scale != 1.0:
        gates = gates * route_scale
    return gates, experts


def placement_order(scores: torch.Tensor, experts: torch.Tensor, batch_prioritized: bool) -> torch.Tensor | None:
    """[tokens] order in which tokens claim slots within each choice rank; None for input order.

    Batch-prioritized: descending score of each token's first choice (``experts[:, 0]``), ties
    in input order."""
    if not batch_prioritized:
        return None
    top1_scores = scores.detach().gather(1, experts[:, :1]).squeeze(1)
    return torch.sort(top1_scores, descending=True, stable=True).indices


def plan_routes(
    scores: torch.Tensor,
    top_k: int,
    capacity_factor: float,
    *,
    normalize_gate: bool = True,
    batch_prioritized: bool = False,
    selection_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    top_groups: int | None = None,
    route_scale: float = 1.0,
    capacity: int | None = None,
    static_shapes: bool | None = None,
) -> RoutingPlan:
    """Assign each token's top-k choices to expert slots.

    scores: [tokens, experts] routing scores (float32 or float64).
    selection_bias, num_groups, top_groups, route_scale: see :func:`top_k_gates`.
    capacity: a fixed number of slots per expert (overrides ``capacity_factor``; overflowing
        choices are dropped), as Switch Transformers' ``expert_capacity``.
    static_shapes: with a capacity, keep the dropped entries (marked, see :attr:`RoutingPlan.kept`)
        so that no shape depends on the data; None: when ``torch.compile`` traces the call.
    """
    num_tokens, num_experts = scores.shape
    gates, experts = top_k_gates(
        scores,
        top_k,
        normalize_gate,
        selection_bias=selection_bias,
        num_groups=num_groups,
        top_groups=top_groups,
        route_scale=route_scale,
    )
    order = placement_order(scores, experts, batch_prioritized)

    # Sequence of claims: choice-major, tokens in placement order within a choice, so claim i
    # is choice i // num_tokens of the token at placement position i % num_tokens.
    if order is not None:
        experts, gates = experts[order], gates[order]
    claim_expert = experts.T.reshape(-1)
    claim_gate = gates.T.reshape(-1)

    tokens_per_expert = count_per_expert(claim_expert, num_experts)
    # A stable sort by expert keeps the claim order inside each expert: rank = slot.
    sorted_expert, by_expert = torch.sort(claim_expert, stable=True)
    slot = None
    if capacity is not None or capacity_factor != 0:  # dropless needs no cut: capacity is the largest load
        if capacity is None:
            capacity = expert_capacity(capacity_factor, tokens_per_expert, num_tokens, top_k)
        slot = rank_within_expert(sorted_expert, tokens_per_expert)
        if static_shapes is None:
            static_shapes = torch.compiler.is_compiling()
        if static_shapes:  # kept entries first, in (expert, slot) order; the dropped ones after
            kept = torch.sort((slot >= capacity).to(torch.uint8), stable=True).indices
        else:
            kept = torch.nonzero(slot < capacity).squeeze(1)
        by_expert, sorted_expert, slot = by_expert[kept], sorted_expert[kept], slot[kept]
        kept_per_expert = tokens_per_expert.clamp(max=capacity)
        kept_mask = slot < capacity if static_shapes else None
    else:
        kept_per_expert, kept_mask = tokens_per_expert, None

    gates = claim_gate[by_expert]
    if kept_mask is not None:
        gates = torch.where(kept_mask, gates, 0.0)
    position = by_expert % num_tokens if top_k > 1 else by_expert
    return RoutingPlan(
        token_index=position if order is None else order[position],
        expert_index=sorted_expert,
        gates=gates,
        tokens_per_expert=tokens_per_expert,
        kept_per_expert=kept_per_expert,
        num_tokens=num_tokens,
        claim_index=by_expert,
        _capacity=capacity,
        _slot=slot,
        kept=kept_mask,
    )
