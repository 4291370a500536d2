"""The expert-parallel executor: experts spread over a process group, tokens exchanged.

One call: the count exchange (settings checked, capacity and per-expert counts agreed, one host
read) -> the expert step at one :class:`~flexmoe.parallel.ParallelChoice` -> the outputs of this
rank's tokens. The expert step is either exact (:mod:`flexmoe.parallel.exact`: exactly the
routed rows, variable splits, experts on exact counts) or padded
(:mod:`flexmoe.parallel.expert_parallel`: ``[num_experts, capacity, model_dim]`` blocks). With a
run-time tuner the choice comes from the tuner, which times the expert step forward + backward.
"""

from __future__ import annotations

import time
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from flexmoe.config import ACTIVATIONS, GRANULARITIES, ROUTERS, SCORE_FUNCTIONS, MoEConfig
from flexmoe.executors.kernels import grouped_unsupported_reason, prefers_per_expert
from flexmoe.experts import FFNExperts
from flexmoe.ops import combine, dispatch
from flexmoe.parallel.checks import CallRefused, dtype_code, refusal_code
from flexmoe.parallel.choices import check_choice, valid_choices
from flexmoe.parallel.config import A2A_ALGORITHMS, ParallelChoice, ParallelConfig
from flexmoe.parallel.counts import CountTable, exchange_counts
from flexmoe.parallel.exact import ExactCompute, run_exact
from flexmoe.parallel.expert_parallel import gather_expert_weights, run_expert_parallel
from flexmoe.parallel.groups import ParallelGroups
from flexmoe.parallel.layout import ExpertLayout
from flexmoe.routing import RoutingPlan
from flexmoe.tuner import Tuner, TuningKey, measure_layer_call

# Expert-parallel layers built so far per group (by its global ranks); see ExpertParallelExecutor.
_LAYERS_BUILT: dict[tuple[int, ...], int] = {}


def layer_settings(
    config: MoEConfig,
    groups: ParallelGroups,
    choice: ParallelChoice,
    top_k: int | None = None,
    dtype: torch.dtype | None = None,
    needs_grad: tuple[bool, bool] = (False, False),
    tuned: bool = False,
) -> dict[str, int]:
    """What every rank of the group must agree on (as ints): the options that change the layer's
    computation (checked at construction and on every call), plus the call's choice, top-k, dtype
    and gradient needs. A callable activation cannot be compared: it counts as one value."""
    return {
        "activation": ACTIVATIONS.index(config.activation) if config.activation in ACTIVATIONS else len(ACTIVATIONS),
        "router": ROUTERS.index(config.router),
        "score_function": SCORE_FUNCTIONS.index(config.score_function),
        "granularity": GRANULARITIES.index(config.granularity),
        "normalize_gate": int(config.normalize_gate),
        "num_shared_experts": config.num_shared_experts,
        "shared_hidden_dim": config.shared_hidden_dim or 0,
        "model_dim": config.model_dim,
        "num_experts": config.num_experts,
        "hidden_dim": config.hidden_dim or 0,
        "gated": int(config.gated),
        "bias": int(config.bias),
        "local_world_size": groups.local_world_size,
        "top_k": top_k or config.top_k,
        "input_requires_grad": int(needs_grad[0]),
        "experts_require_grad": int(needs_grad[1]),
        "dtype": -1 if dtype is None else dtype_code(dtype),
        "parallel_degree": choice.parallel_degree,
        "overlap_degree": choice.overlap_degree,
        "a2a_algorithm": A2A_ALGORITHMS.index(choice.a2a_algorithm),
        "exact": int(choice.exact),
        "tuned": int(tuned),
    }


def tuning_key(config: MoEConfig, layout: ExpertLayout, capacity: int, top_k: int, tokens: torch.Tensor) -> TuningKey:
    """The tuner's key for a call at the agreed ``capacity``: the same on every rank, since it
    reads only agreed settings, shapes, dtype and device type, never values."""
    return TuningKey.for_call(
        world_size=layout.world_size,
        capacity=capacity,
        model_dim=config.model_dim,
        hidden_dim=config.hidden_dim or 1,  # custom experts: their shapes are the layer's own
        local_experts=layout.local_experts,
        top_k=top_k,
        dtype=tokens.dtype,
        device=tokens.device,
        shards_per_expert=layout.shards_per_expert,
    )


class ExpertParallelExecutor:
    """Runs a plan over ``groups``: this rank holds ``experts`` (its part of the layer's experts,
    ``layout`` says which). ``parallel``: the default choice; ``tuner``: picks the choice per
    workload when a call fixes none (every rank must build its layers with tuners alike)."""

    def __init__(
        self,
        experts: nn.Module,
        config: MoEConfig,
        layout: ExpertLayout,
        groups: ParallelGroups,
        parallel: ParallelConfig,
        tuner: Tuner | None = None,
    ) -> None:
        self.experts, self.config, self.layout, self.groups, self.parallel = experts, config, layout, groups, parallel
        self.tuner = tuner
        # The n-th expert-parallel layer built over these ranks: construction is collective, so
        # every rank numbers the group's layers alike.
        ranks = tuple(groups.global_ranks)
        self.layer_id = _LAYERS_BUILT.get(ranks, 0)
        _LAYERS_BUILT[ranks] = self.layer_id + 1

    @property
    def tuner(self) -> Tuner | None:
        return self._tuner

    @tuner.setter
    def tuner(self, tuner: Tuner | None) -> None:
        if tuner is not None and not isinstance(tuner, Tuner):
            raise TypeError(f"tuner must be a flexmoe.Tuner or None, got {type(tuner).__name__}")
        if tuner is not None:
            # The tuner agrees on decisions over its group: it must be the layer's ranks.
            tuner_ranks = dist.get_process_group_ranks(tuner.group or dist.group.WORLD)
            if tuner_ranks != self.groups.global_ranks:
                raise ValueError(
                    f"the tuner's group (ranks {tuner_ranks}) must be the layer's "
                    f"(ranks {self.groups.global_ranks}): pass Tuner(group=...) the layer's process group"
                )
        self._tuner = tuner

    # --- choices ------------------------------------------------------------------------------

    @property
    def builtin_experts(self) -> bool:
        """Built-in FFN experts: every degree, exact counts. Custom experts: r = 1, padded."""
        return isinstance(self.experts, FFNExperts)

    def valid_choices(self) -> list[ParallelChoice]:
        """Every (r, d, algorithm, exact) this executor can run; all give the same result."""
        return valid_choices(self.layout, self.groups, self.builtin_experts)

    def check_choice(self, choice: ParallelChoice) -> ParallelChoice:
        return check_choice(choice, self.layout, self.groups, self.builtin_experts)

    def default_choice(self, parallel: ParallelConfig) -> ParallelChoice:
        exact_possible = self.builtin_experts and self.config.expert_kernel != "padded"
        return parallel.default_choice(exact_possible)

    # --- one call -----------------------------------------------------------------------------

    def run(
        self, tokens: torch.Tensor, plan: RoutingPlan, choice: ParallelChoice | None = None, top_k: int = 0
    ) -> torch.Tensor:
        """tokens: [T, model_dim] -> [T, model_dim] over the group (T may differ per rank, 0
        included). ``plan``: this rank's own (as a single-process layer would route these
        tokens). ``choice`` None: the tuner's (with a tuner), else the default. Collective:
        every rank calls it with the same choice and top_k."""
        plan = plan.compact()  # the exchanges count kept entries only
        tuned = choice is None and self.tuner is not None
        choice = choice or self.default_choice(self.parallel)
        grad_mode = torch.is_grad_enabled()
        # Which exchanges backward will run: every rank must run the same ones.
        needs_grad = (
            grad_mode and tokens.requires_grad,
            grad_mode and any(p.requires_grad for p in self.experts.parameters()),
        )
        settings = layer_settings(self.config, self.groups, choice, top_k, tokens.dtype, needs_grad, tuned)
        settings["layer"] = self.layer_id  # layers called in another order on another rank meet here
        settings["refused"] = 0
        table = exchange_counts(settings, plan, self.layout, self.groups, tokens.device)
        if tuned:
            return self.run_tuned(tokens, plan, table, self.tuning_key(table.capacity, top_k, tokens))
        return self.expert_step(tokens, plan, table, choice)

    def refuse_call(self, argument: str, error: ValueError | TypeError) -> NoReturn:
        """Raise ``error`` (``argument``, one of :data:`~flexmoe.parallel.checks.CALL_ARGUMENTS`,
        is invalid on this rank) on every rank of the group: this rank meets its peers' count
        exchange with the argument marked, so they raise :class:`CallRefused` naming it instead
        of waiting for a rank that will not come."""
        settings = layer_settings(self.config, self.groups, self.default_choice(self.parallel))
        settings["layer"] = self.layer_id
        settings["refused"] = refusal_code(argument)
        try:
            exchange_counts(settings, None, self.layout, self.groups, self.groups.collective_device)
        except CallRefused as refused:
            raise type(error)(f"{refused}; on this rank: {error}") from error
        raise AssertionError("a refused call passed the count exchange")  # the exchange always raises

    def expert_step(
        self, tokens: torch.Tensor, plan: RoutingPlan, table: CountTable, choice: ParallelChoice
    ) -> torch.Tensor:
        """dispatch -> (all-to-all) -> experts -> (all-to-all) -> combine at ``choice``:
        tokens [T, model_dim] -> [T, model_dim]. The unit whose time depends on the choice (and
        only on it, with the counts agreed): what the tuner times. Every rank passes the same choice."""
        if choice.exact:
            compute = self.exact_compute(choice.parallel_degree, tokens.dtype)
            return run_exact(
                tokens, plan, table, compute, self.layout, self.groups, choice.parallel_degree, choice.overlap_degree
            )
        num_tokens, model_dim = tokens.shape
        capacity = table.capacity
        rows = plan.expert_index * capacity + plan.slot
        num_rows = plan.num_experts * capacity
        buffer = dispatch(tokens, plan.token_index, rows, num_rows).view(plan.num_experts, capacity, model_dim)
        expert_out = run_expert_parallel(buffer, self.experts, self.layout, self.groups, choice)
        return combine(expert_out.reshape(num_rows, model_dim), plan.gates, plan.token_index, rows, num_tokens)

    def exact_compute(self, parallel_degree: int, dtype: torch.dtype) -> ExactCompute:
        """The experts at degree r on exact counts: (rows [n, M] sorted by expert, counts) -> [n, M].
        The kernel: ``grouped_mm`` where it can run (per ``expert_kernel``), else one GEMM pair
        per expert; a forced ``"grouped"`` that cannot run raises here, before any exchange."""
        requested = self.config.expert_kernel
        # The hidden width computed with: the whole expert at r = 0, a 1 / r slice at r >= 1.
        dims = (self.config.model_dim, self.config.hidden_dim // max(parallel_degree, 1))
        grouped_reason = grouped_unsupported_reason(self.experts, dims, dtype)
        if requested == "grouped" and grouped_reason:
            raise ValueError(f"expert_kernel='grouped' cannot run here: {grouped_reason}; use 'auto'")
        weights = gather_expert_weights(self.experts, self.layout, self.groups, parallel_degree)

        def compute(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
            busy = sum(1 for count in counts if count)
            per_expert = (
                requested == "per_expert"
                or grouped_reason is not None
                or (requested == "auto" and prefers_per_expert(rows.device, rows.shape[0], busy))
            )
            return self.experts.forward_exact_with(rows, counts, weights, "per_expert" if per_expert else "grouped")

        return compute

    # --- tuning -------------------------------------------------------------------------------

    def tuning_key(self, capacity: int, top_k: int, tokens: torch.Tensor) -> TuningKey:
        """The tuner's key for a call at the agreed ``capacity`` (see :func:`tuning_key`)."""
        return tuning_key(self.config, self.layout, capacity, top_k or self.config.top_k, tokens)

    def run_tuned(self, tokens: torch.Tensor, plan: RoutingPlan, table: CountTable, key: TuningKey) -> torch.Tensor:
        """:meth:`expert_step` with the tuner's choice for ``key``: tokens [T, M] -> [T, M].

        While ``key`` is tuning, the step is timed forward + backward (``measure_layer_call``)
        and reported to the tuner, scaled to the bucket's capacity (the ranks are aligned by a
        barrier before each clock reading); once decided it runs untimed. Every rank calls the
        tuner in the same order (same keys, same candidates), so every rank runs the same choice.
        """
        choice = self.tuner.choose(key, self.valid_choices())
        if not self.tuner.is_tuning(key):
            return self.expert_step(tokens, plan, table, choice)
        # Calls of one bucket differ in capacity by up to 2x: report the time scaled to the
        # bucket's capacity (the step's cost grows linearly with it), so that a candidate timed
        # on a small capacity does not beat one timed on a large capacity for that reason alone.
        scale = key.capacity_bucket / max(table.capacity, 1)

        def report(seconds: float) -> None:
            self.tuner.record(key, choice, seconds * scale)

        def step(x: torch.Tensor) -> torch.Tensor:
            return self.expert_step(x, plan, table, choice)

        return measure_layer_call(step, tokens, report, clock=self._aligned_clock)

    def _aligned_clock(self) -> float:
        """The time once every rank of the group got here (tuning only): a rank's measurement
        then holds the step itself, not its wait for a peer that came late to the step."""
        dist.barrier(group=self.groups.group)
        return time.perf_counter()
