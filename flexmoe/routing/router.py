"""The Router: tokens -> routing units -> scores -> :class:`RoutingPlan`, one object per layer.

It owns every routing decision of an :class:`~flexmoe.MoELayer`: the score function, gate noise,
the loss-free selection bias, group-limited routing, the route scale and the granularity
(token, sentence, task embedding). Task extraction and pruning ask it for a task's gates instead
of re-threading these settings.

The router reads the layer's modules (``gate``: the linear / cosine scorer registered as
``layer.router``; ``task_embedding``; ``load_balancer``) rather than registering them itself, so
the state-dict keys (``router.weight``, ``task_embedding.weight``, ``load_balancer.bias``) stay
those of the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flexmoe.config import MoEConfig
from flexmoe.routing.balance import LoadBalanceBias
from flexmoe.routing.granularity import routing_units
from flexmoe.routing.plan import RoutingPlan, plan_routes, top_k_gates
from flexmoe.routing.scores import routing_scores


@dataclass
class Routing:
    """One call's routing: the plan and what the aux loss and stats read.

    plan: the contract with execution (see :class:`RoutingPlan`).
    logits, scores: [routed tokens, num_experts] clean logits and routing scores (float32, or
        float64 for float64 input); noisy_logits: the same with gate noise (training) or None.
    """

    plan: RoutingPlan
    logits: torch.Tensor
    noisy_logits: torch.Tensor | None
    scores: torch.Tensor


class Router:
    """The routing of one layer. ``config``: the layer's :class:`MoEConfig`; ``gate``: the scorer
    module ``[units, dim] -> logits [units, num_experts]``; ``task_embedding`` (task granularity)
    and ``load_balancer`` (loss-free balancing) as the layer holds them, or None."""

    __slots__ = ("config", "gate", "load_balancer", "task_embedding")

    def __init__(
        self,
        config: MoEConfig,
        gate: nn.Module,
        task_embedding: nn.Embedding | None = None,
        load_balancer: LoadBalanceBias | None = None,
    ) -> None:
        self.config, self.gate = config, gate
        self.task_embedding, self.load_balancer = task_embedding, load_balancer

    @property
    def selection_bias(self) -> torch.Tensor | None:
        """[num_experts] bias added to the scores for the top-k choice only, or None."""
        return None if self.load_balancer is None else self.load_balancer.bias

    def scores(
        self, router_inputs: torch.Tensor, training: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """router_inputs: [units, dim] -> (clean logits, noisy logits or None, routing scores),
        each [units, num_experts] in float32 (float64 for float64 input), outside autocast.
        Gate noise is added in ``training`` only."""
        device_type = router_inputs.device.type
        if torch.is_autocast_enabled(device_type):  # entering the context costs a few µs: only when needed
            with torch.autocast(device_type, enabled=False):
                return self.scores(router_inputs, training)
        config = self.config
        logits = self.gate(router_inputs)
        noisy_logits = None
        if training and config.gate_noise > 0:
            noisy_logits = logits + config.gate_noise * torch.randn_like(logits)
        scores = routing_scores(logits if noisy_logits is None else noisy_logits, config.score_function)
        return logits, noisy_logits, scores

    def plan(
        self, scores: torch.Tensor, top_k: int, capacity_factor: float, capacity: int | None = None
    ) -> RoutingPlan:
        """scores: [tokens, num_experts] -> the :class:`RoutingPlan` (top-k choice with the
        selection bias and group limits, gates, capacity cut)."""
        config = self.config
        return plan_routes(
            scores,
            top_k,
            capacity_factor,
            normalize_gate=config.normalize_gate,
            batch_prioritized=config.batch_prioritized_routing,
            selection_bias=self.selection_bias,
            num_groups=config.num_groups,
            top_groups=config.top_groups,
            route_scale=config.route_scale,
            capacity=capacity,
        )

    def route(
        self,
        x: torch.Tensor,
        tokens: torch.Tensor,
        routed_positions: torch.Tensor | None,
        *,
        top_k: int,
        capacity_factor: float,
        capacity: int | None = None,
        padding_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        sentence_inputs: torch.Tensor | None = None,
        training: bool = False,
    ) -> Routing:
        """Route one call. x: the layer input [..., model_dim]; tokens: [routed, model_dim] its
        routed (non-padding) tokens, at ``routed_positions`` [routed] of the flattened input
        (None: all). The other arguments as :meth:`flexmoe.MoELayer.forward` takes them."""
        units = routing_units(
            self.config.granularity, x, routed_positions, padding_mask, task_ids, self.task_embedding, sentence_inputs
        )
        logits, noisy_logits, scores = self.scores(tokens if units.inputs is None else units.inputs, training)
        if units.unit_of_token is not None:  # a unit's scores for each of its tokens
            logits, scores = logits[units.unit_of_token], scores[units.unit_of_token]
            noisy_logits = None if noisy_logits is None else noisy_logits[units.unit_of_token]
        return Routing(self.plan(scores, top_k, capacity_factor, capacity), logits, noisy_logits, scores)

    def task_gates(self, task_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed routing of task ``task_id`` (task granularity, no gate noise): (gate
        weights [top_k], experts [top_k]), best first, as :meth:`route` gives every token of it."""
        config = self.config
        if self.task_embedding is None:
            raise ValueError("task_gates needs a task-routed layer (granularity='task')")
        if not 0 <= task_id < config.num_tasks:
            raise ValueError(f"task_id must be in 0..num_tasks-1 = 0..{config.num_tasks - 1}, got {task_id}")
        with torch.no_grad():
            _, _, scores = self.scores(self.task_embedding.weight[task_id : task_id + 1])
            gates, experts = top_k_gates(
                scores,
                config.top_k,
                config.normalize_gate,
                selection_bias=self.selection_bias,
                num_groups=config.num_groups,
                top_groups=config.top_groups,
                route_scale=config.route_scale,
            )
        return gates[0], experts[0]
