"""The single-process executor: dispatch -> experts -> combine, every expert in this process."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.config import MoEConfig
from flexmoe.executors.kernels import grouped_unsupported_reason, prefers_per_expert
from flexmoe.experts import PER_EXPERT_MIN_ROWS
from flexmoe.ops import combine, dispatch
from flexmoe.parallel.choices import check_choice
from flexmoe.parallel.config import ParallelChoice
from flexmoe.routing import RoutingPlan


class LocalExecutor:
    """Runs a plan through ``experts`` (all ``num_experts`` of them) in this process.

    The kernel is picked per call from ``config.expert_kernel`` (see :meth:`kernel`). A custom
    expert module maps ``[num_experts, capacity, model_dim]`` to the same shape (padded only).
    """

    tuner = None  # one candidate: nothing to tune

    def __init__(self, experts: nn.Module, config: MoEConfig) -> None:
        self.experts, self.config = experts, config

    def valid_choices(self) -> list[ParallelChoice]:
        return [ParallelChoice(1)]

    def check_choice(self, choice: ParallelChoice) -> ParallelChoice:
        return check_choice(choice, None, None, True)

    def default_choice(self, parallel) -> ParallelChoice:
        return parallel.default_choice(exact_possible=False)

    def uses_grouped_layout(self, dtype: torch.dtype) -> bool:
        """Whether the experts may run on exact counts with ``grouped_mm`` (``auto`` / ``grouped``
        and the experts implement ``forward_grouped`` for this dtype and these shapes)."""
        kernel = self.config.expert_kernel
        if kernel in ("padded", "per_expert"):
            return False
        hidden_dim = getattr(self.experts, "hidden_dim", self.config.hidden_dim) or 0
        reason = grouped_unsupported_reason(self.experts, (self.config.model_dim, hidden_dim), dtype)
        if kernel == "grouped" and reason:
            raise ValueError(f"expert_kernel='grouped' cannot run here: {reason}; use 'auto' or 'padded'")
        return reason is None

    def runs_padded(self, dtype: torch.dtype) -> bool:
        """Whether every call in ``dtype`` runs the padded layout (then a dropless call needs the
        capacity, its largest load)."""
        kernel = self.config.expert_kernel
        if kernel != "auto":
            return kernel == "padded"
        # auto where grouped_mm cannot run (float64, some shapes): exact counts per expert when the
        # experts have that kernel (a dropless padded buffer is [experts, largest load, dim]: on a
        # skewed batch several times the routed rows), the padded layout for custom experts.
        return not self.uses_grouped_layout(dtype) and not hasattr(self.experts, "forward_per_expert")

    def kernel(self, tokens: torch.Tensor, plan: RoutingPlan) -> str:
        """How the experts run this call: ``"grouped"`` (exact counts, ``grouped_mm``),
        ``"per_expert"`` (exact counts, one GEMM pair per expert) or ``"padded"``
        (``[experts, capacity, model_dim]``, ``bmm``). See ``MoEConfig.expert_kernel``."""
        kernel = self.config.expert_kernel
        if self.runs_padded(tokens.dtype):
            return "padded"
        if kernel == "per_expert" or not self.uses_grouped_layout(tokens.dtype):
            return "per_expert"
        if (
            kernel == "auto"
            and tokens.device.type == "cpu"
            and plan.num_entries >= PER_EXPERT_MIN_ROWS  # cheap test first: counting busy experts syncs
            and hasattr(self.experts, "forward_per_expert")
        ):
            if torch.compiler.is_compiling():
                # Decided from shapes alone (no host read, no graph break): every expert counted busy.
                busy_experts = plan.num_experts
            else:  # rows per expert that got any (a task-routed batch fills only its k experts)
                busy_experts = int(torch.count_nonzero(plan.kept_per_expert))
            if prefers_per_expert(tokens.device, plan.num_entries, busy_experts):
                return "per_expert"
        return "grouped"

    def run(
        self, tokens: torch.Tensor, plan: RoutingPlan, choice: ParallelChoice | None = None, top_k: int = 0
    ) -> torch.Tensor:
        """tokens: [T, model_dim] -> [T, model_dim], the gate-weighted sum of each token's kept
        choices. ``choice`` and ``top_k`` play no part in a single process."""
        num_tokens, model_dim = tokens.shape
        kernel = self.kernel(tokens, plan)
        # A static-shape plan (see RoutingPlan.kept) keeps its dropped entries, with gate 0, after
        # the kept ones: the exact-count kernels run the first sum(counts) rows, the padded layout
        # sends the dropped entries to one extra row past the experts' buffer.
        kept = plan.kept
        if kernel == "per_expert":  # dispatch and combine inside, one expert at a time
            counts, token_index, gates = plan.kept_per_expert, plan.token_index, plan.gates
            return self.experts.forward_per_expert(tokens, counts, token_index=token_index, gates=gates)
        if kernel == "grouped":
            buffer = dispatch(tokens, plan.token_index)
            if kept is not None:  # grouped_mm leaves rows past the last group unwritten, both ways
                buffer = _zero_dropped(buffer, kept)
            expert_out = self.experts.forward_grouped(buffer, plan.kept_per_expert)
            if kept is not None:
                expert_out = _zero_dropped(expert_out, kept)
            return combine(expert_out, plan.gates, plan.token_index, None, num_tokens)
        rows = plan.padded_rows()
        num_rows = plan.num_experts * plan.capacity
        extra_row = 0 if kept is None else 1
        buffer = dispatch(tokens, plan.token_index, rows, num_rows + extra_row)[:num_rows]
        expert_out = self.experts(buffer.view(plan.num_experts, plan.capacity, model_dim))
        if expert_out.shape != (plan.num_experts, plan.capacity, model_dim):
            raise ValueError(
                f"experts must map [num_experts, capacity, model_dim] to the same shape; "
                f"got {tuple(expert_out.shape)} for input {(plan.num_experts, plan.capacity, model_dim)}"
            )
        expert_out = expert_out.reshape(num_rows, model_dim)
        if kept is not None:  # the dropped entries' row: zeros
            expert_out = F.pad(expert_out, (0, 0, 0, 1))
        return combine(expert_out, plan.gates, plan.token_index, rows, num_tokens)


def _zero_dropped(rows: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """rows [entries, dim] with the dropped entries' rows (``kept`` [entries] False) set to zero."""
    return torch.where(kept.unsqueeze(1), rows, rows.new_zeros(()))
