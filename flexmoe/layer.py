"""MoELayer: the drop-in FFN replacement. Reads as units -> router -> plan -> executor -> shared experts."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from flexmoe.config import (
    SECTIONS,
    ExpertsConfig,
    MoEConfig,
    check_capacity_factor,
    check_top_k,
    config_from_sections,
)
from flexmoe.distributed.ddp import mark_experts_for_ddp, refuse_experts_under_ddp
from flexmoe.distributed.experts import distribute_layer_experts, local_expert_shards
from flexmoe.distributed.inputs import run_on_local_shard
from flexmoe.executors import ExpertParallelExecutor, LocalExecutor
from flexmoe.executors.expert_parallel import layer_settings
from flexmoe.experts import FFNExperts
from flexmoe.ops import attach_aux_loss
from flexmoe.parallel.checks import agree_across_ranks
from flexmoe.parallel.config import (
    ParallelChoice,
    ParallelConfig,
    check_a2a_algorithm,
    check_bool,
    check_overlap_degree,
    check_parallel_config,
)
from flexmoe.parallel.data_parallel import mark_expert_module, non_expert_parameters
from flexmoe.parallel.groups import ParallelGroups, resolve_groups
from flexmoe.parallel.layout import ExpertLayout
from flexmoe.routing import RoutingPlan, build_router, gshard_balance_loss, load_importance_loss, router_z_loss
from flexmoe.routing.balance import LoadBalanceBias
from flexmoe.routing.granularity import check_padding_mask
from flexmoe.routing.router import Router, Routing
from flexmoe.routing.scores import routing_scores
from flexmoe.shared_experts import SharedExperts
from flexmoe.stats import RoutingStats
from flexmoe.tuner import Tuner


class MoELayer(nn.Module):
    """Mixture-of-Experts FFN: input ``[..., model_dim]`` -> output of the same shape.

    Build it from keyword options (``MoELayer(model_dim=512, num_experts=8, hidden_dim=2048)``),
    from sections (``MoELayer(model_dim=512, num_experts=8, routing=RoutingConfig(top_k=1),
    experts=ExpertsConfig(hidden_dim=2048), shared_experts=SharedExpertsConfig(...))``, see
    :mod:`flexmoe.config`) or from a :class:`MoEConfig` (``MoELayer(config)``, options given
    beside it override it). ``experts``: an :class:`~flexmoe.config.ExpertsConfig`, or a custom
    module mapping ``[num_experts, capacity, model_dim]`` to the same shape that replaces the
    built-in FFN experts.

    One forward: routing units -> :attr:`routing` (a :class:`~flexmoe.routing.router.Router`)
    -> :class:`~flexmoe.RoutingPlan` -> ``executor.run(tokens, plan)`` -> + shared experts.
    After each forward: ``layer.aux_loss`` (scalar; its gradient already flows through the
    output, see ``MoEConfig.aux_loss_in_backward``) and ``layer.stats`` (:class:`RoutingStats`).

    Distributed: the layer is expert-parallel only when given a ``group``: a process group, a
    1-D ``torch.distributed.device_mesh.DeviceMesh`` (or one with an ``"ep"`` dimension), or a
    shared :class:`~flexmoe.parallel.ParallelGroups`. ``None`` (or
    ``flexmoe.parallel.SINGLE_PROCESS``) keeps every expert in this process, also under
    torchrun (data parallelism then replicates the layer as any other module). With a group of W
    ranks, ``layer.layout`` (:class:`~flexmoe.parallel.ExpertLayout`) says which experts (or
    hidden slices) this rank stores in ``layer.experts``, as DTensor parameters of the global
    shape on the expert-parallel mesh (the mesh given, or one over the process group; see
    :mod:`flexmoe.distributed.placements`); the kernels run on the local shards. Custom experts
    then hold the ``num_experts / W`` local experts and need ``num_experts >= W`` (DTensors when
    they declare a ``hidden_axis`` dict, else plain local shards). DistributedDataParallel
    leaves the experts out (:mod:`flexmoe.distributed.ddp`). ``parallel``
    (:class:`~flexmoe.parallel.ParallelConfig`) sets the default parallel degree, pipelining
    degree, all-to-all algorithm and exact counts; each can be changed per call. Building a
    distributed layer is collective: every rank of the group builds it (the router is broadcast
    from the group's first rank).

    ``tuner`` (:class:`~flexmoe.Tuner`): run-time tuning of the distributed expert step. Each
    call that passes none of ``parallel_degree`` / ``overlap_degree`` / ``a2a_algorithm`` /
    ``exact`` asks the tuner for a choice among :meth:`valid_parallel_choices`, keyed by the
    call's workload (world size, bucket of the agreed capacity, shapes, dtype, device); while
    that key is being tuned the expert step is timed forward + backward and reported, afterwards
    the decided choice runs untimed. Several layers may share one tuner (keys differ by shape).
    Every rank must build its layers with tuners alike. A single-process layer has one
    candidate, so it has nothing to tune.
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
        if isinstance(experts, ExpertsConfig):  # the experts section, not a module
            options["experts"], experts = experts, None
        config = _resolve_config(config, options)
        self.executor: LocalExecutor | ExpertParallelExecutor | None = None
        self.config = config
        self.router = build_router(config.router, config.router_input_dim, config.num_experts, config.cosine_proj_dim)
        self.task_embedding: nn.Embedding | None = None
        if config.granularity == "task":
            self.task_embedding = nn.Embedding(config.num_tasks, config.router_input_dim)
        self.parallel = check_parallel_config(parallel)
        self.groups = resolve_groups(group, self.parallel.local_world_size)
        world_size, rank = (1, 0) if self.groups is None else (self.groups.world_size, self.groups.rank)
        if self.groups is not None:
            # Before anything that could fail on one rank only or issue a mismatched collective.
            settings = layer_settings(config, self.groups, self.parallel.default_choice())
            agree_across_ranks(settings, 0, self.groups.group, self.groups.collective_device)
        self.layout = ExpertLayout(config.num_experts, world_size, rank)
        self.experts = self._check_experts(experts, config)
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
        self.executor = self._build_executor()
        if self.groups is not None:
            self.check_choice(self.executor.default_choice(self.parallel))
            # Replicated parameters start equal on every rank (as DDP would make them).
            self.groups.broadcast_from_first_rank([p for _, p in non_expert_parameters(self)])
            # DDP must not manage the expert shards: it would overwrite and average them.
            mark_experts_for_ddp(self)
            self.register_forward_pre_hook(refuse_experts_under_ddp)
            # The experts as DTensors of their global shape on the ep mesh; kernels see local shards.
            distribute_layer_experts(self)
        self.tuner = tuner
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.stats: RoutingStats | None = None
        # Set by flexmoe.task.usage while it records routing; None otherwise.
        self.last_plan: RoutingPlan | None = None
        self.record_plan = False

    def _build_executor(self) -> LocalExecutor | ExpertParallelExecutor:
        """The executor for this layer's group: local, or expert-parallel over the group."""
        if self.groups is None:
            return LocalExecutor(self.experts, self.config)
        return ExpertParallelExecutor(self.experts, self.config, self.layout, self.groups, self.parallel)

    def _check_experts(self, experts: nn.Module | None, config: MoEConfig) -> nn.Module:
        if experts is None:
            if config.hidden_dim is None:
                raise ValueError("hidden_dim is required unless custom experts are given")
            return self._build_local_experts(config)
        if not isinstance(experts, nn.Module):
            raise TypeError(f"experts must be an nn.Module, got {type(experts).__name__}")
        if config.expert_kernel in ("grouped", "per_expert") and not hasattr(
            experts, f"forward_{config.expert_kernel}"
        ):
            raise ValueError(
                f"expert_kernel={config.expert_kernel!r} needs experts with forward_{config.expert_kernel}(); "
                "use 'auto' or 'padded'"
            )
        if self.layout.shards_per_expert > 1:
            raise ValueError(
                f"custom experts need num_experts ({config.num_experts}) >= the group's world size "
                f"({self.layout.world_size})"
            )
        return experts

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

    # --- parts ----------------------------------------------------------------------------

    @property
    def config(self) -> MoEConfig:
        return self.__dict__["_config"]

    @config.setter
    def config(self, config: MoEConfig) -> None:
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.__dict__["_config"] = config
        if self.__dict__.get("executor") is not None:
            self.executor.config = config

    @property
    def routing(self) -> Router:
        """This layer's :class:`~flexmoe.routing.router.Router` over its current modules
        (``router``, ``task_embedding``, ``load_balancer``) and config."""
        modules = self._modules
        return Router(self.config, modules["router"], modules.get("task_embedding"), modules.get("load_balancer"))

    @property
    def tuner(self) -> Tuner | None:
        return self.executor.tuner

    @tuner.setter
    def tuner(self, tuner: Tuner | None) -> None:
        if tuner is not None and not isinstance(tuner, Tuner):
            raise TypeError(f"tuner must be a flexmoe.Tuner or None, got {type(tuner).__name__}")
        self.executor.tuner = tuner

    def valid_parallel_choices(self) -> list[ParallelChoice]:
        """Every (parallel_degree, overlap_degree, a2a_algorithm, exact) this layer can run with
        its group. All give the same result; they differ in speed. Single-process: one."""
        return self.executor.valid_choices()

    def check_choice(self, choice: ParallelChoice) -> ParallelChoice:
        """Raise ValueError unless ``choice`` is valid for this layer's layout and group."""
        return self.executor.check_choice(choice)

    def uses_grouped_layout(self, dtype: torch.dtype) -> bool:
        """Single process: whether the experts may run ``grouped_mm`` on exact counts in ``dtype``."""
        return isinstance(self.executor, LocalExecutor) and self.executor.uses_grouped_layout(dtype)

    def expert_kernel(self, tokens: torch.Tensor, plan: RoutingPlan) -> str:
        """Single process: the kernel this call runs (``"grouped"``, ``"per_expert"`` or ``"padded"``)."""
        return self.executor.kernel(tokens, plan)

    def _choice_for_call(
        self,
        parallel_degree: int | None,
        overlap_degree: int | None,
        a2a_algorithm: str | None,
        exact: bool | None,
    ) -> ParallelChoice | None:
        """The call's choice; None when the tuner picks it (a tuner is set, nothing was passed)."""
        passed = (parallel_degree, overlap_degree, a2a_algorithm, exact)
        if passed == (None, None, None, None) and (self.groups is None or self.tuner is not None):
            return None
        default = self.executor.default_choice(self.parallel)
        algorithm = default.a2a_algorithm if a2a_algorithm is None else check_a2a_algorithm(a2a_algorithm)
        if exact is None:  # the default's, where the algorithm allows it
            exact = default.exact and algorithm == "linear"
        choice = ParallelChoice(
            default.parallel_degree if parallel_degree is None else parallel_degree,
            default.overlap_degree if overlap_degree is None else check_overlap_degree(overlap_degree),
            algorithm,
            check_bool("exact", exact),
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
        if "config" in state:  # pickled before the layer had an executor
            state["_config"] = state.pop("config")
            tuner = state.pop("tuner", None)
            super().__setstate__(state)
            self.executor = None
            self.executor = self._build_executor()
            self.tuner = tuner
            return
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
        exact: bool | None = None,
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
        parallel_degree, overlap_degree, a2a_algorithm, exact: override the ``parallel``
            defaults for this call (None = the default; see :meth:`valid_parallel_choices`). Same
            result for every valid choice. Every rank of the group must pass the same values. With
            a ``tuner``, passing none of them lets the tuner choose; passing any fixes the choice.

        A DTensor ``x`` sharded over token dimensions (or replicated) gives a DTensor output of
        the same placements, computed on the local shard (:mod:`flexmoe.distributed.inputs`).
        """
        if isinstance(x, DTensor):
            call = dict(top_k=top_k, capacity_factor=capacity_factor, padding_mask=padding_mask, task_ids=task_ids)
            call.update(sentence_inputs=sentence_inputs, parallel_degree=parallel_degree, exact=exact)
            call.update(overlap_degree=overlap_degree, a2a_algorithm=a2a_algorithm)
            return run_on_local_shard(self.forward, x, call)
        config = self.config
        # The argument being checked: an invalid one on one rank is refused on every rank.
        argument = "parallel choice"
        try:
            choice = self._choice_for_call(parallel_degree, overlap_degree, a2a_algorithm, exact)
            argument = "top_k"
            top_k = config.top_k if top_k is None else check_top_k(top_k, config.selectable_experts)
            argument = "capacity_factor"
            fixed_capacity = config.expert_capacity if capacity_factor is None else None
            capacity_factor = (
                config.capacity_factor
                if capacity_factor is None
                else check_capacity_factor(capacity_factor, config.num_experts)
            )
            argument = "x"
            all_tokens = self._flatten_input(x)
            argument = "padding_mask"
            check_padding_mask(padding_mask, x)
            routed_positions = None if padding_mask is None else torch.nonzero(~padding_mask.reshape(-1)).squeeze(1)
            tokens = all_tokens if routed_positions is None else all_tokens.index_select(0, routed_positions)
            argument = "routing inputs"
            routing = self.routing.route(
                x,
                tokens,
                routed_positions,
                top_k=top_k,
                capacity_factor=capacity_factor,
                capacity=fixed_capacity,
                padding_mask=padding_mask,
                task_ids=task_ids,
                sentence_inputs=sentence_inputs,
                training=self.training,
            )
        except (ValueError, TypeError) as error:
            if self.groups is None:
                raise
            self.executor.refuse_call(argument, error)
        plan, expert_tokens = routing.plan, _autocast_dtype(tokens)
        executor = self.executor
        if (
            plan.num_tokens
            and not plan.has_capacity
            and isinstance(executor, LocalExecutor)
            and executor.runs_padded(expert_tokens.dtype)
        ):
            # Dropless on the padded layout: the buffer is as large as the largest load. Read here,
            # in forward itself, torch.compile breaks the graph once (deeper, once per call level).
            plan.capacity = int(plan.tokens_per_expert.max())
        out = self.executor.run(expert_tokens, plan, choice, top_k)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens).to(out.dtype)
        if routed_positions is not None:
            out = out.new_zeros(all_tokens.shape[0], out.shape[1]).index_copy(0, routed_positions, out)
        out = self._record(routing, top_k, out)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _record(self, routing: Routing, top_k: int, out: torch.Tensor) -> torch.Tensor:
        """After a forward: the balancer's load, the aux loss (lazily without grad), the stats.
        Returns ``out`` [tokens, model_dim], with the aux loss attached when it is differentiable."""
        plan = routing.plan
        if self.load_balancer is not None and self.training:
            self.load_balancer.record(plan.tokens_per_expert)
        # Plain attributes, set in __dict__: nn.Module.__setattr__'s checks cost µs at decode sizes.
        state = self.__dict__
        pending = (routing.logits, routing.noisy_logits, routing.scores, top_k)
        if torch.is_grad_enabled():
            aux_loss = self.compute_aux_loss(*pending)
            if self.config.aux_loss_in_backward:  # its gradient flows through the output; logged detached
                out, aux_loss = attach_aux_loss(out, aux_loss), aux_loss.detach()
            self.aux_loss = aux_loss
        else:
            # Nothing can differentiate it: compute it only if read (inference seldom does).
            state["_pending_aux_loss"] = pending
        state["stats"] = self._record_stats(plan, routing.scores, top_k)
        state["last_plan"] = plan.compact() if self.record_plan else None
        return out

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
        each [units, num_experts] (see :meth:`flexmoe.routing.router.Router.scores`)."""
        return self.routing.scores(router_inputs, self.training)

    def run_experts(
        self, tokens: torch.Tensor, plan: RoutingPlan, choice: ParallelChoice | None = None, top_k: int | None = None
    ) -> torch.Tensor:
        """dispatch -> experts -> combine by the executor: tokens [T, model_dim] -> [T, model_dim]."""
        with local_expert_shards(self):
            return self.executor.run(_autocast_dtype(tokens), plan, choice, top_k or self.config.top_k)

    def compute_aux_loss(
        self, logits: torch.Tensor, noisy_logits: torch.Tensor | None, scores: torch.Tensor, top_k: int
    ) -> torch.Tensor:
        """``aux_loss_weight * balance + z_loss * z`` (0 for an empty batch). Routing units
        whose logits or scores are not finite (a NaN or inf in the input) are left out of both
        (``layer.stats.non_finite_units`` counts them): one bad token would otherwise make the
        loss, and through it every token's gradient, NaN."""
        config = self.config
        total = scores.new_zeros(())
        if scores.shape[0] == 0 or (config.aux_loss is None and config.z_loss <= 0):
            return total
        valid = torch.isfinite(logits).all(dim=1) & torch.isfinite(scores).all(dim=1)  # no host read
        if config.aux_loss == "gshard":
            total = total + config.aux_loss_weight * gshard_balance_loss(scores, scores.argmax(dim=1), valid)
        elif config.aux_loss == "load_importance":
            clean_scores = scores if noisy_logits is None else routing_scores(logits, config.score_function)
            chosen = scores.topk(top_k, dim=1).indices
            balance = load_importance_loss(clean_scores, logits, noisy_logits, chosen, config.gate_noise, valid)
            total = total + config.aux_loss_weight * balance
        if config.z_loss > 0:
            total = total + config.z_loss * router_z_loss(logits, valid)
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


def _resolve_config(config: MoEConfig | None, options: dict[str, Any]) -> MoEConfig:
    """The layer's config from a MoEConfig, flat options and / or sections (``routing``,
    ``experts``, ``shared_experts``); options and sections override the given config."""
    sections = {name: options.pop(name) for name in SECTIONS if name in options}
    if config is None:
        return config_from_sections(**options, **sections) if sections else MoEConfig(**options)
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
    for name, section in sections.items():
        if not isinstance(section, SECTIONS[name]):
            raise TypeError(f"{name} must be a {SECTIONS[name].__name__}, got {type(section).__name__}")
        options = {**dataclasses.asdict(section), **options}
    return dataclasses.replace(config, **options) if options else config


def _autocast_dtype(tokens: torch.Tensor) -> torch.Tensor:
    """The experts run in autocast's dtype when autocast is on (the router does not)."""
    device_type = tokens.device.type
    if torch.is_autocast_enabled(device_type):
        return tokens.to(torch.get_autocast_dtype(device_type))
    return tokens
