"""MoELayer: the drop-in FFN replacement. Orchestrates route -> dispatch -> experts -> combine."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from flexmoe.config import MoEConfig, check_capacity_factor, check_top_k
from flexmoe.experts import GROUPED_DTYPES, FFNExperts
from flexmoe.ops import combine, dispatch
from flexmoe.routing import (
    RoutingPlan,
    build_router,
    gshard_balance_loss,
    load_importance_loss,
    plan_routes,
    router_entropy,
    router_z_loss,
)
from flexmoe.routing.balance import LoadBalanceBias
from flexmoe.routing.granularity import check_padding_mask, routing_units
from flexmoe.routing.scores import routing_scores
from flexmoe.shared_experts import SharedExperts
from flexmoe.stats import RoutingStats


class MoELayer(nn.Module):
    """Mixture-of-Experts FFN: input ``[..., model_dim]`` -> output of the same shape.

    Build it from keyword options (``MoELayer(model_dim=512, num_experts=8, hidden_dim=2048)``)
    or from a :class:`MoEConfig` (``MoELayer(config)``, options given beside it override it).
    ``experts``: an optional custom module mapping ``[num_experts, capacity, model_dim]`` to
    the same shape; it replaces the built-in FFN experts.

    After each forward: ``layer.aux_loss`` (scalar to add to the training loss) and
    ``layer.stats`` (:class:`RoutingStats`).
    """

    def __init__(self, config: MoEConfig | None = None, *, experts: nn.Module | None = None, **options: Any) -> None:
        super().__init__()
        if config is None:
            config = MoEConfig(**options)
        elif not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        elif options:
            config = dataclasses.replace(config, **options)
        self.config = config
        self.router = build_router(config.router, config.router_input_dim, config.num_experts, config.cosine_proj_dim)
        self.task_embedding: nn.Embedding | None = None
        if config.granularity == "task":
            self.task_embedding = nn.Embedding(config.num_tasks, config.router_input_dim)
        if experts is None:
            if config.hidden_dim is None:
                raise ValueError("hidden_dim is required unless custom experts are given")
            experts = FFNExperts(
                config.num_experts, config.model_dim, config.hidden_dim, config.activation, config.bias, config.gated
            )
        elif not isinstance(experts, nn.Module):
            raise TypeError(f"experts must be an nn.Module, got {type(experts).__name__}")
        elif config.expert_layout == "grouped" and not hasattr(experts, "forward_grouped"):
            raise ValueError("expert_layout='grouped' needs experts with forward_grouped(); use 'auto' or 'padded'")
        self.experts = experts
        self.shared_experts: SharedExperts | None = None
        if config.num_shared_experts:
            self.shared_experts = SharedExperts(
                config.num_shared_experts,
                config.model_dim,
                config.shared_hidden_dim or config.hidden_dim,
                config.activation,
                config.bias,
                config.gated,
                config.shared_expert_gate,
            )
        self.load_balancer: LoadBalanceBias | None = None
        if config.loss_free_balance:
            self.load_balancer = LoadBalanceBias(config.num_experts, config.balance_update_rate)
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.stats: RoutingStats | None = None
        # Set by flexmoe.task.usage while it records routing; None otherwise.
        self.last_plan: RoutingPlan | None = None
        self.record_plan = False

    def __getstate__(self) -> dict[str, Any]:
        # The last aux loss is part of the autograd graph; copies and pickles keep its value only.
        state = self.__dict__.copy()
        state["aux_loss"] = self.aux_loss.detach()
        return state

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"model_dim={c.model_dim}, num_experts={c.num_experts}, top_k={c.top_k}, "
            f"capacity_factor={c.capacity_factor}"
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        top_k: int | None = None,
        capacity_factor: float | None = None,
        padding_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [..., model_dim] -> [..., model_dim].

        top_k, capacity_factor: override the configured values for this call only.
        padding_mask: bool ``x.shape[:-1]``, True at padding positions; those are not routed
            (no capacity used, output 0) and sentence routing averages over the others.
        task_ids: int ``[batch]`` or ``x.shape[:-1]``; required by task-routed layers, ignored
            by the others (so a model can pass it to every layer).
        """
        config = self.config
        top_k = config.top_k if top_k is None else check_top_k(top_k, config.selectable_experts)
        fixed_capacity = config.expert_capacity if capacity_factor is None else None
        capacity_factor = config.capacity_factor if capacity_factor is None else check_capacity_factor(capacity_factor)
        all_tokens = self._flatten_input(x)
        check_padding_mask(padding_mask, x)
        routed_positions = None if padding_mask is None else torch.nonzero(~padding_mask.reshape(-1)).squeeze(1)
        tokens = all_tokens if routed_positions is None else all_tokens.index_select(0, routed_positions)

        units = routing_units(config.granularity, x, routed_positions, padding_mask, task_ids, self.task_embedding)
        logits, noisy_logits, scores = self.route_scores(tokens if units.inputs is None else units.inputs)
        if units.unit_of_token is not None:
            logits, scores = logits[units.unit_of_token], scores[units.unit_of_token]
            noisy_logits = None if noisy_logits is None else noisy_logits[units.unit_of_token]
        plan = plan_routes(
            scores,
            top_k,
            capacity_factor,
            normalize_gate=config.normalize_gate,
            batch_prioritized=config.batch_prioritized_routing,
            selection_bias=None if self.load_balancer is None else self.load_balancer.bias,
            num_groups=config.num_groups,
            top_groups=config.top_groups,
            route_scale=config.route_scale,
            capacity=fixed_capacity,
        )
        out = self.run_experts(tokens, plan)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens).to(out.dtype)
        if self.load_balancer is not None and self.training:
            self.load_balancer.record(plan.tokens_per_expert)
        if routed_positions is not None:
            out = out.new_zeros(all_tokens.shape[0], out.shape[1]).index_copy(0, routed_positions, out)
        self.aux_loss = self.compute_aux_loss(logits, noisy_logits, scores, top_k)
        self.stats = self._record_stats(plan, scores, top_k)
        self.last_plan = plan if self.record_plan else None
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def update_load_balance_bias(self, process_group: Any = None) -> torch.Tensor:
        """Loss-free balancing step; call after ``optimizer.step()``.

        ``bias += balance_update_rate * sign(mean_load - load_e)`` with the loads of all training
        forwards since the last call (then reset), summed over ``process_group`` when given (data
        parallelism: every rank applies the same update). Returns those loads, [num_experts].
        """
        if self.load_balancer is None:
            raise ValueError("update_load_balance_bias needs a layer built with loss_free_balance=True")
        return self.load_balancer.update(process_group)

    # --- the steps ------------------------------------------------------------------------

    def _flatten_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.config.model_dim:
            raise ValueError(f"x must have shape [..., model_dim={self.config.model_dim}], got {tuple(x.shape)}")
        if self.config.check_finite and not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf (check_finite=True)")
        return x.reshape(-1, self.config.model_dim)

    def route_scores(self, router_inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """router_inputs: [units, dim] -> (clean logits, noisy logits or None, routing scores),
        each [units, num_experts] in float32 (float64 for float64 input), outside autocast."""
        with torch.autocast(router_inputs.device.type, enabled=False):
            logits = self.router(router_inputs)
            noisy_logits = None
            if self.training and self.config.gate_noise > 0:
                noisy_logits = logits + self.config.gate_noise * torch.randn_like(logits)
            scores = routing_scores(logits if noisy_logits is None else noisy_logits, self.config.score_function)
        return logits, noisy_logits, scores

    def uses_grouped_layout(self, dtype: torch.dtype) -> bool:
        """Whether the experts run on exact counts (grouped) rather than the padded buffer.

        ``auto`` picks grouped when the experts implement ``forward_grouped`` and
        ``grouped_mm`` takes the dtype and shapes (float32/bfloat16/float16; row strides of
        ``model_dim`` and ``hidden_dim`` a multiple of 16 bytes).
        """
        layout = self.config.expert_layout
        if layout == "padded":
            return False
        reason = self._grouped_unsupported_reason(dtype)
        if layout == "grouped" and reason:
            raise ValueError(f"expert_layout='grouped' cannot run here: {reason}; use 'auto' or 'padded'")
        return reason is None

    def _grouped_unsupported_reason(self, dtype: torch.dtype) -> str | None:
        if not hasattr(self.experts, "forward_grouped"):
            return "the experts have no forward_grouped()"
        if dtype not in GROUPED_DTYPES:
            return f"grouped_mm supports {GROUPED_DTYPES}, got {dtype}"
        itemsize = torch.empty((), dtype=dtype).element_size()
        dims = (self.config.model_dim, getattr(self.experts, "hidden_dim", self.config.hidden_dim) or 0)
        if any(d * itemsize % 16 for d in dims):
            return f"grouped_mm needs model_dim and hidden_dim {dims} times {itemsize} bytes to be multiples of 16"
        return None

    def run_experts(self, tokens: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """dispatch -> experts -> combine. tokens: [T, model_dim] -> [T, model_dim]."""
        if torch.is_autocast_enabled(tokens.device.type):
            tokens = tokens.to(torch.get_autocast_dtype(tokens.device.type))
        num_tokens, model_dim = tokens.shape
        if self.uses_grouped_layout(tokens.dtype):
            buffer = dispatch(tokens, plan.token_index)
            expert_out = self.experts.forward_grouped(buffer, plan.kept_per_expert)
            return combine(expert_out, plan.gates, plan.token_index, None, num_tokens)
        rows = plan.padded_rows()
        num_rows = plan.num_experts * plan.capacity
        buffer = dispatch(tokens, plan.token_index, rows, num_rows)
        expert_out = self.experts(buffer.view(plan.num_experts, plan.capacity, model_dim))
        if expert_out.shape != (plan.num_experts, plan.capacity, model_dim):
            raise ValueError(
                f"experts must map [num_experts, capacity, model_dim] to the same shape; "
                f"got {tuple(expert_out.shape)} for input {(plan.num_experts, plan.capacity, model_dim)}"
            )
        return combine(expert_out.reshape(num_rows, model_dim), plan.gates, plan.token_index, rows, num_tokens)

    def compute_aux_loss(
        self, logits: torch.Tensor, noisy_logits: torch.Tensor | None, scores: torch.Tensor, top_k: int
    ) -> torch.Tensor:
        """``aux_loss_weight * balance + z_loss * z`` (0 for an empty batch)."""
        config = self.config
        total = scores.new_zeros(())
        if scores.shape[0] == 0:
            return total
        if config.aux_loss == "gshard":
            total = total + config.aux_loss_weight * gshard_balance_loss(scores, scores.argmax(dim=1))
        elif config.aux_loss == "load_importance":
            clean_scores = scores if noisy_logits is None else routing_scores(logits, config.score_function)
            chosen = scores.topk(top_k, dim=1).indices
            balance = load_importance_loss(clean_scores, logits, noisy_logits, chosen, config.gate_noise)
            total = total + config.aux_loss_weight * balance
        if config.z_loss > 0:
            total = total + config.z_loss * router_z_loss(logits)
        return total

    def _record_stats(self, plan: RoutingPlan, scores: torch.Tensor, top_k: int) -> RoutingStats:
        with torch.no_grad():
            entropy = router_entropy(scores) if scores.shape[0] else scores.new_zeros(())
            return RoutingStats(
                tokens_per_expert=plan.tokens_per_expert,
                kept_per_expert=plan.kept_per_expert,
                dropped=plan.num_tokens * top_k - plan.kept_per_expert.sum(),
                capacity=plan.capacity,
                num_tokens=plan.num_tokens,
                top_k=top_k,
                router_entropy=entropy,
            )
