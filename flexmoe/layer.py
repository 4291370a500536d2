"""MoELayer: the drop-in FFN replacement. Orchestrates route -> dispatch -> experts -> combine."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flexmoe.config import MoEConfig, check_capacity_factor, check_top_k
from flexmoe.experts import GROUPED_DTYPES, PER_EXPERT_MIN_ROWS, FFNExperts
from flexmoe.ops import attach_aux_loss, combine, dispatch
from flexmoe.parallel.checks import agree_across_ranks, dtype_code
from flexmoe.parallel.choices import check_choice, valid_choices
from flexmoe.parallel.config import (
    A2A_ALGORITHMS,
    ParallelChoice,
    ParallelConfig,
    check_a2a_algorithm,
    check_overlap_degree,
    check_parallel_config,
)
from flexmoe.parallel.data_parallel import mark_expert_module, non_expert_parameters
from flexmoe.parallel.expert_parallel import run_expert_parallel
from flexmoe.parallel.groups import ParallelGroups, resolve_groups
from flexmoe.parallel.layout import ExpertLayout
from flexmoe.routing import (
    RoutingPlan,
    build_router,
    gshard_balance_loss,
    load_importance_loss,
    plan_routes,
    router_z_loss,
)
from flexmoe.routing.balance import LoadBalanceBias
from flexmoe.routing.granularity import check_padding_mask, routing_units
from flexmoe.routing.scores import routing_scores
from flexmoe.shared_experts import SharedExperts
from flexmoe.stats import RoutingStats
from flexmoe.tuner import Tuner, TuningKey, measure_layer_call


class MoELayer(nn.Module):
    """Mixture-of-Experts FFN: input ``[..., model_dim]`` -> output of the same shape.

    Build it from keyword options (``MoELayer(model_dim=512, num_experts=8, hidden_dim=2048)``)
    or from a :class:`MoEConfig` (``MoELayer(config)``, options given beside it override it).
    ``experts``: an optional custom module mapping ``[num_experts, capacity, model_dim]`` to
    the same shape; it replaces the built-in FFN experts.

    After each forward: ``layer.aux_loss`` (scalar; its gradient already flows through the
    output, see ``MoEConfig.aux_loss_in_backward``) and ``layer.stats`` (:class:`RoutingStats`).

    Distributed: ``group`` is a process group, a shared :class:`~flexmoe.parallel.ParallelGroups`,
    or None (the world group when ``torch.distributed`` is initialised with more than one rank,
    else single-process); ``flexmoe.parallel.SINGLE_PROCESS`` forces a local layer. With a group
    of W ranks, ``layer.layout`` (:class:`~flexmoe.parallel.ExpertLayout`) says which experts (or
    hidden slices) this rank stores in ``layer.experts``; custom experts then hold the
    ``num_experts / W`` local experts and need ``num_experts >= W``. ``parallel``
    (:class:`~flexmoe.parallel.ParallelConfig`) sets the default parallel degree, pipelining
    degree and all-to-all algorithm; each can be changed per call. Building a distributed
    layer is collective: every rank of the group builds it (the router is broadcast from the
    group's first rank).

    ``tuner`` (:class:`~flexmoe.Tuner`): run-time tuning of the distributed expert step. Each
    call that passes none of ``parallel_degree`` / ``overlap_degree`` / ``a2a_algorithm``
    asks the tuner for a choice among :meth:`valid_parallel_choices`, keyed by the call's
    workload (:meth:`tuning_key`: world size, bucket of the agreed capacity, shapes, dtype,
    device); while that key is being tuned the expert step is timed forward + backward and
    reported, afterwards the decided choice runs untimed. Several layers may share one tuner
    (keys differ by shape). Every rank must build its layers with tuners alike. A
    single-process layer has one candidate, so it has nothing to tune.
    """

    def __init__(
        self,
        config: MoEConfig | None = None,
        *,
        experts: nn.Module | None = None,
        group: dist.ProcessGroup | ParallelGroups | object | None = None,
        parallel: ParallelConfig | None = None,
        tuner: Tuner | None = None,
        **options: Any,
    ) -> None:
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
        self.parallel = check_parallel_config(parallel)
        self.groups = resolve_groups(group, self.parallel.local_world_size)
        self.tuner = self._check_tuner(tuner)
        world_size, rank = (1, 0) if self.groups is None else (self.groups.world_size, self.groups.rank)
        if self.groups is not None:
            # Before anything that could fail on one rank only or issue a mismatched collective.
            agree_across_ranks(self._settings(), 0, self.groups.group, self.groups.collective_device)
        self.layout = ExpertLayout(config.num_experts, world_size, rank)
        if experts is None:
            if config.hidden_dim is None:
                raise ValueError("hidden_dim is required unless custom experts are given")
            experts = self._build_local_experts(config)
        elif not isinstance(experts, nn.Module):
            raise TypeError(f"experts must be an nn.Module, got {type(experts).__name__}")
        elif config.expert_layout in ("grouped", "per_expert") and not hasattr(
            experts, f"forward_{config.expert_layout}"
        ):
            raise ValueError(
                f"expert_layout={config.expert_layout!r} needs experts with forward_{config.expert_layout}(); "
                "use 'auto' or 'padded'"
            )
        elif self.layout.shards_per_expert > 1:
            raise ValueError(
                f"custom experts need num_experts ({config.num_experts}) >= the group's world size ({world_size})"
            )
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
        mark_expert_module(self.experts)
        if self.groups is not None:
            if config.expert_layout in ("grouped", "per_expert"):
                raise ValueError(
                    f"expert_layout={config.expert_layout!r} is single-process only; with a group use 'auto'"
                )
            self.check_choice(self.parallel.default_choice)
            # Replicated parameters start equal on every rank (as DDP would make them).
            self.groups.broadcast_from_first_rank([p for _, p in non_expert_parameters(self)])
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.stats: RoutingStats | None = None
        # Set by flexmoe.task.usage while it records routing; None otherwise.
        self.last_plan: RoutingPlan | None = None
        self.record_plan = False

    def _check_tuner(self, tuner: object) -> Tuner | None:
        if tuner is not None and not isinstance(tuner, Tuner):
            raise TypeError(f"tuner must be a flexmoe.Tuner or None, got {type(tuner).__name__}")
        if tuner is not None and self.groups is not None:
            # The tuner agrees on decisions over its group: it must be the layer's ranks.
            tuner_ranks = dist.get_process_group_ranks(tuner.group or dist.group.WORLD)
            if tuner_ranks != self.groups.global_ranks:
                raise ValueError(
                    f"the tuner's group (ranks {tuner_ranks}) must be the layer's (ranks {self.groups.global_ranks}): "
                    "pass Tuner(group=...) the layer's process group"
                )
        return tuner

    def _settings(
        self,
        choice: ParallelChoice | None = None,
        top_k: int | None = None,
        dtype: torch.dtype | None = None,
        needs_grad: tuple[bool, bool] = (False, False),
        tuned: bool = False,
    ) -> dict[str, int]:
        """What every rank of the group must agree on (as ints), for :func:`agree_across_ranks`."""
        config, parallel = self.config, self.parallel
        choice = choice or parallel.default_choice
        return {
            "model_dim": config.model_dim,
            "num_experts": config.num_experts,
            "hidden_dim": config.hidden_dim or 0,
            "gated": int(config.gated),
            "bias": int(config.bias),
            "local_world_size": 0 if self.groups is None else self.groups.local_world_size,
            "top_k": top_k or config.top_k,
            "input_requires_grad": int(needs_grad[0]),
            "experts_require_grad": int(needs_grad[1]),
            "dtype": -1 if dtype is None else dtype_code(dtype),
            "parallel_degree": choice.parallel_degree,
            "overlap_degree": choice.overlap_degree,
            "a2a_algorithm": A2A_ALGORITHMS.index(choice.a2a_algorithm),
            "tuned": int(tuned),
        }

    def _build_local_experts(self, config: MoEConfig) -> FFNExperts:
        """This rank's experts: ``layout.local_experts`` experts of ``hidden_dim / S`` hidden units."""
        local_hidden = self.layout.local_hidden_dim(config.hidden_dim)
        generator = None
        if self.groups is not None:
            # Each rank initialises different experts/slices even when all ranks share a seed.
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())) + self.layout.rank)
        return FFNExperts(
            self.layout.local_experts,
            config.model_dim,
            local_hidden,
            config.activation,
            config.bias,
            config.gated,
            init_hidden_dim=config.hidden_dim,
            generator=generator,
        )

    # --- parallel choices -----------------------------------------------------------------

    def valid_parallel_choices(self) -> list[ParallelChoice]:
        """Every (parallel_degree, overlap_degree, a2a_algorithm) this layer can run with its group.

        All give the same result; they differ in speed. Single-process: only the default.
        """
        return valid_choices(self.layout, self.groups, isinstance(self.experts, FFNExperts))

    def check_choice(self, choice: ParallelChoice) -> ParallelChoice:
        """Raise ValueError unless ``choice`` is valid for this layer's layout and group."""
        return check_choice(choice, self.layout, self.groups, isinstance(self.experts, FFNExperts))

    def _choice_for_call(
        self, parallel_degree: int | None, overlap_degree: int | None, a2a_algorithm: str | None
    ) -> ParallelChoice | None:
        """The call's choice; None when the tuner picks it (a tuner is set, nothing was passed)."""
        if self.tuner is not None and (parallel_degree, overlap_degree, a2a_algorithm) == (None, None, None):
            return None
        default = self.parallel
        choice = ParallelChoice(
            default.parallel_degree if parallel_degree is None else parallel_degree,
            default.overlap_degree if overlap_degree is None else check_overlap_degree(overlap_degree),
            default.a2a_algorithm if a2a_algorithm is None else check_a2a_algorithm(a2a_algorithm),
        )
        return self.check_choice(choice)

    @property
    def aux_loss(self) -> torch.Tensor:
        """Scalar auxiliary loss of the last forward (see :meth:`compute_aux_loss`); after a
        forward without grad it is computed on first read."""
        pending = self.__dict__.get("_pending_aux_loss")
        if pending is not None:
            with torch.no_grad():
                self.aux_loss = self.compute_aux_loss(*pending)
        return self.__dict__["_aux_loss"]

    @aux_loss.setter
    def aux_loss(self, value: torch.Tensor) -> None:
        self.__dict__["_pending_aux_loss"] = None
        self.__dict__["_aux_loss"] = value

    def __getstate__(self) -> dict[str, Any]:
        # The last aux loss is part of the autograd graph; copies and pickles keep its value only.
        state = self.__dict__.copy()
        state["_aux_loss"] = self.aux_loss.detach()
        state["_pending_aux_loss"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "aux_loss" in state:  # pickled before aux_loss became a property
            state["_aux_loss"] = state.pop("aux_loss")
        super().__setstate__(state)

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
        sentence_inputs: torch.Tensor | None = None,
        parallel_degree: int | None = None,
        overlap_degree: int | None = None,
        a2a_algorithm: str | None = None,
    ) -> torch.Tensor:
        """x: [..., model_dim] -> [..., model_dim].

        top_k, capacity_factor: override the configured values for this call only.
        padding_mask: bool ``x.shape[:-1]``, True at padding positions; those are not routed
            (no capacity used, output 0) and sentence routing averages over the others.
        task_ids: int ``[batch]`` or ``x.shape[:-1]``; required by task-routed layers, ignored
            by the others (so a model can pass it to every layer).
        sentence_inputs: ``[batch, model_dim]`` router input per sequence for a sentence-routed
            layer (default: the mean of the sequence's non-padding tokens); ignored by the others.
            A decoder routes by its source sentence this way: its own mean would see target
            tokens that step-by-step decoding has not produced yet.
        parallel_degree, overlap_degree, a2a_algorithm: override the ``parallel`` defaults for
            this call (None = the default; see :meth:`valid_parallel_choices`). Same result
            for every valid choice. Every rank of the group must pass the same values. With a
            ``tuner``, passing none of them lets the tuner choose; passing any fixes the choice.
        """
        config = self.config
        choice = self._choice_for_call(parallel_degree, overlap_degree, a2a_algorithm)
        top_k = config.top_k if top_k is None else check_top_k(top_k, config.selectable_experts)
        fixed_capacity = config.expert_capacity if capacity_factor is None else None
        capacity_factor = config.capacity_factor if capacity_factor is None else check_capacity_factor(capacity_factor)
        all_tokens = self._flatten_input(x)
        check_padding_mask(padding_mask, x)
        routed_positions = None if padding_mask is None else torch.nonzero(~padding_mask.reshape(-1)).squeeze(1)
        tokens = all_tokens if routed_positions is None else all_tokens.index_select(0, routed_positions)

        units = routing_units(
            config.granularity, x, routed_positions, padding_mask, task_ids, self.task_embedding, sentence_inputs
        )
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
        out = self.run_experts(tokens, plan, choice, top_k)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens).to(out.dtype)
        if self.load_balancer is not None and self.training:
            self.load_balancer.record(plan.tokens_per_expert)
        if routed_positions is not None:
            out = out.new_zeros(all_tokens.shape[0], out.shape[1]).index_copy(0, routed_positions, out)
        # Plain attributes, set in __dict__: nn.Module.__setattr__'s checks cost µs at decode sizes.
        state = self.__dict__
        if torch.is_grad_enabled():
            aux_loss = self.compute_aux_loss(logits, noisy_logits, scores, top_k)
            if config.aux_loss_in_backward:  # its gradient flows through the output; logged detached
                out, aux_loss = attach_aux_loss(out, aux_loss), aux_loss.detach()
            self.aux_loss = aux_loss
        else:
            # Nothing can differentiate it: compute it only if read (inference seldom does).
            state["_pending_aux_loss"] = (logits, noisy_logits, scores, top_k)
        state["stats"] = self._record_stats(plan, scores, top_k)
        state["last_plan"] = plan if self.record_plan else None
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
        device_type = router_inputs.device.type
        if torch.is_autocast_enabled(device_type):  # entering the context costs a few µs: only when needed
            with torch.autocast(device_type, enabled=False):
                return self.route_scores(router_inputs)
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
        if layout in ("padded", "per_expert"):
            return False
        reason = self._grouped_unsupported_reason(dtype)
        if layout == "grouped" and reason:
            raise ValueError(f"expert_layout='grouped' cannot run here: {reason}; use 'auto' or 'padded'")
        return reason is None

    def expert_kernel(self, tokens: torch.Tensor, plan: RoutingPlan) -> str:
        """How the experts run this call (single process): ``"grouped"`` (exact counts,
        ``grouped_mm``), ``"per_expert"`` (exact counts, one GEMM pair per expert) or ``"padded"``
        (``[experts, capacity, model_dim]``, ``bmm``). See ``MoEConfig.expert_layout``."""
        layout = self.config.expert_layout
        if layout in ("padded", "per_expert"):
            return layout
        if not self.uses_grouped_layout(tokens.dtype):
            return "padded"
        if (
            layout == "auto"
            and tokens.device.type == "cpu"
            and plan.num_kept >= PER_EXPERT_MIN_ROWS  # cheap test first: counting busy experts syncs
            and hasattr(self.experts, "forward_per_expert")
        ):
            # Rows per expert that got any (a task-routed batch fills only its k experts).
            busy_experts = int(torch.count_nonzero(plan.kept_per_expert))
            if plan.num_kept >= PER_EXPERT_MIN_ROWS * max(busy_experts, 1):
                return "per_expert"
        return "grouped"

    def _grouped_unsupported_reason(self, dtype: torch.dtype) -> str | None:
        if not hasattr(self.experts, "forward_grouped"):
            return "the experts have no forward_grouped()"
        if dtype not in GROUPED_DTYPES:
            return f"grouped_mm supports {GROUPED_DTYPES}, got {dtype}"
        itemsize = dtype.itemsize
        dims = (self.config.model_dim, getattr(self.experts, "hidden_dim", self.config.hidden_dim) or 0)
        if any(d * itemsize % 16 for d in dims):
            return f"grouped_mm needs model_dim and hidden_dim {dims} times {itemsize} bytes to be multiples of 16"
        return None

    def run_experts(
        self, tokens: torch.Tensor, plan: RoutingPlan, choice: ParallelChoice | None = None, top_k: int | None = None
    ) -> torch.Tensor:
        """dispatch -> experts -> combine. tokens: [T, model_dim] -> [T, model_dim].
        choice and top_k (checked to agree over the group) matter only with a group; choice
        None: the tuner's (when the layer has one), else the ``parallel`` default."""
        if torch.is_autocast_enabled(tokens.device.type):
            tokens = tokens.to(torch.get_autocast_dtype(tokens.device.type))
        if self.groups is not None:
            return self.run_experts_distributed(tokens, plan, choice, top_k or self.config.top_k)
        num_tokens, model_dim = tokens.shape
        kernel = self.expert_kernel(tokens, plan)
        if kernel == "per_expert":  # dispatch and combine inside, one expert at a time
            counts, token_index, gates = plan.kept_per_expert, plan.token_index, plan.gates
            return self.experts.forward_per_expert(tokens, counts, token_index=token_index, gates=gates)
        if kernel == "grouped":
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

    def run_experts_distributed(
        self, tokens: torch.Tensor, plan: RoutingPlan, choice: ParallelChoice | None, top_k: int
    ) -> torch.Tensor:
        """dispatch -> (all-to-all) -> experts -> (all-to-all) -> combine over the group.

        tokens: [T, model_dim] -> [T, model_dim]. The plan is this rank's own (the same as a
        single-process layer on these tokens); the buffer ``[num_experts, capacity, model_dim]``
        uses the largest capacity of any rank so every rank exchanges blocks of one shape.
        choice None: the tuner picks it for the agreed capacity (the default without a tuner).
        """
        tuned = choice is None and self.tuner is not None
        choice = choice or self.parallel.default_choice
        num_tokens, model_dim = tokens.shape
        # Which exchanges backward will run: every rank must run the same ones.
        grad_mode = torch.is_grad_enabled()
        needs_grad = (
            grad_mode and tokens.requires_grad,
            grad_mode and any(p.requires_grad for p in self.experts.parameters()),
        )
        settings = self._settings(choice, top_k, tokens.dtype, needs_grad, tuned)
        capacity = agree_across_ranks(settings, plan.capacity, self.groups.group, tokens.device)
        rows = plan.expert_index * capacity + plan.slot
        num_rows = plan.num_experts * capacity
        buffer = dispatch(tokens, plan.token_index, rows, num_rows).view(plan.num_experts, capacity, model_dim)
        if tuned:
            expert_out = self.run_tuned_expert_step(buffer, self.tuning_key(capacity, top_k, buffer))
        else:
            expert_out = self.run_expert_step(buffer, choice)
        return combine(expert_out.reshape(num_rows, model_dim), plan.gates, plan.token_index, rows, num_tokens)

    def run_expert_step(self, buffer: torch.Tensor, choice: ParallelChoice) -> torch.Tensor:
        """(all-to-all) -> experts -> (all-to-all): buffer [num_experts, capacity, model_dim] -> same shape.

        The unit whose time depends on ``choice`` (and only on it, with the capacity agreed): the
        place a run-time tuner picks among :meth:`valid_parallel_choices` per capacity bucket and
        times forward + backward. Every rank must pass the same choice.
        """
        return run_expert_parallel(buffer, self.experts, self.layout, self.groups, choice)

    def tuning_key(self, capacity: int, top_k: int, buffer: torch.Tensor) -> TuningKey:
        """The tuner's key for a call at the agreed ``capacity``: the same on every rank, since
        it reads only agreed settings, shapes, dtype and device type, never values."""
        layout = self.layout
        return TuningKey.for_call(
            world_size=layout.world_size,
            capacity=capacity,
            model_dim=self.config.model_dim,
            hidden_dim=self.config.hidden_dim or 1,  # custom experts: their shapes are the layer's own
            local_experts=layout.local_experts,
            top_k=top_k,
            dtype=buffer.dtype,
            device=buffer.device,
            shards_per_expert=layout.shards_per_expert,
        )

    def run_tuned_expert_step(self, buffer: torch.Tensor, key: TuningKey) -> torch.Tensor:
        """:meth:`run_expert_step` with the tuner's choice for ``key``: buffer [E, capacity, M] -> same.

        While ``key`` is tuning, the step is timed forward + backward (``measure_layer_call``)
        and reported to the tuner, scaled to the bucket's capacity (the ranks are aligned by a
        barrier before each clock reading); once decided it runs untimed. Every rank calls the
        tuner in the same order (same keys, same candidates), so every rank runs the same choice.
        """
        choice = self.tuner.choose(key, self.valid_parallel_choices())
        if not self.tuner.is_tuning(key):
            return self.run_expert_step(buffer, choice)

        # Calls of one bucket differ in capacity by up to 2x: report the time scaled to the
        # bucket's capacity (the step's cost grows linearly with it), so that a candidate timed
        # on a small capacity does not beat one timed on a large capacity for that reason alone.
        scale = key.capacity_bucket / max(buffer.shape[1], 1)

        def report(seconds: float) -> None:
            self.tuner.record(key, choice, seconds * scale)

        return measure_layer_call(lambda x: self.run_expert_step(x, choice), buffer, report, clock=self._aligned_clock)

    def _aligned_clock(self) -> float:
        """The time once every rank of the group got here (tuning only): a rank's measurement
        then holds the step itself, not its wait for a peer that came late to the step."""
        dist.barrier(group=self.groups.group)
        return time.perf_counter()

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
        return RoutingStats(
            tokens_per_expert=plan.tokens_per_expert,
            kept_per_expert=plan.kept_per_expert,
            num_tokens=plan.num_tokens,
            top_k=top_k,
            routing_scores=scores.detach(),  # the entropy is computed when read
            _capacity=plan._capacity,  # None when dropless: read from the counts on first access
        )
