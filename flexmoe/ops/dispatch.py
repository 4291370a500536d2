"""Index-based dispatch and combine with custom autograd (no one-hot tensor, no einsum).

Two buffer layouts share the same two functions:
  * padded:  ``rows`` gives each entry's row in a ``[num_rows = experts * capacity, dim]``
    buffer; empty slots stay zero (the ``[E, C, M]`` layout of GShard/Tutel);
  * grouped: ``rows is None``; the buffer holds exactly the kept entries in plan order
    (sorted by expert), so experts can run on exact token counts.
Cost is O(kept * dim) in time and memory for both.
"""

from __future__ import annotations

import torch
from torch.autograd import Function


def _dispatch_forward(
    x: torch.Tensor, token_index: torch.Tensor, rows: torch.Tensor | None, num_rows: int
) -> torch.Tensor:
    picked = x.index_select(0, token_index)
    if rows is None:
        return picked
    buffer = x.new_zeros(num_rows, x.shape[1])
    return buffer.index_copy_(0, rows, picked)


def _combine_forward(
    expert_out: torch.Tensor,
    gates: torch.Tensor,
    token_index: torch.Tensor,
    rows: torch.Tensor | None,
    num_tokens: int,
) -> torch.Tensor:
    picked = expert_out if rows is None else expert_out.index_select(0, rows)
    weighted = picked * gates.to(picked.dtype).unsqueeze(1)
    out = picked.new_zeros(num_tokens, picked.shape[1])
    return out.index_add_(0, token_index, weighted)


def _needs_autograd(*tensors: torch.Tensor) -> bool:
    # Inference skips the autograd.Function machinery (a fixed cost that matters at decode sizes).
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# forward + setup_context (not ctx in forward): the form torch.func transforms need. The
# backwards use differentiable ops only, so higher derivatives work too.


class _Dispatch(Function):
    @staticmethod
    def forward(x, token_index, rows, num_rows):
        return _dispatch_forward(x, token_index, rows, num_rows)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, token_index, rows, _ = inputs
        ctx.num_tokens = x.shape[0]
        ctx.save_for_backward(token_index, rows)

    @staticmethod
    def backward(ctx, grad_buffer):
        token_index, rows = ctx.saved_tensors
        grad_picked = grad_buffer if rows is None else grad_buffer.index_select(0, rows)
        grad_x = grad_buffer.new_zeros(ctx.num_tokens, grad_buffer.shape[1])
        return grad_x.index_add_(0, token_index, grad_picked), None, None, None


class _Combine(Function):
    @staticmethod
    def forward(expert_out, gates, token_index, rows, num_tokens):
        return _combine_forward(expert_out, gates, token_index, rows, num_tokens)

    @staticmethod
    def setup_context(ctx, inputs, output):
        expert_out, gates, token_index, rows, _ = inputs
        ctx.save_for_backward(expert_out, gates, token_index, rows)

    @staticmethod
    def backward(ctx, grad_out):
        expert_out, gates, token_index, rows = ctx.saved_tensors
        grad_out = grad_out.to(expert_out.dtype)
        grad_rows = grad_out.index_select(0, token_index)
        grad_expert_out = grad_gates = None
        if ctx.needs_input_grad[1]:
            picked = expert_out if rows is None else expert_out.index_select(0, rows)
            # Accumulate the dot products in the gate dtype (float32 under half precision).
            grad_gates = (grad_rows * picked).sum(dim=1, dtype=gates.dtype)
        if ctx.needs_input_grad[0]:
            grad_picked = grad_rows * gates.to(grad_rows.dtype).unsqueeze(1)
            if rows is None:
                grad_expert_out = grad_picked
            else:
                grad_expert_out = grad_picked.new_zeros(expert_out.shape).index_copy_(0, rows, grad_picked)
        return grad_expert_out, grad_gates, None, None, None


def dispatch(
    x: torch.Tensor, token_index: torch.Tensor, rows: torch.Tensor | None = None, num_rows: int = 0
) -> torch.Tensor:
    """Gather tokens into an expert buffer.

    x: [tokens, dim]; token_index: [kept] source token per entry; rows: [kept] destination
    row in a ``[num_rows, dim]`` zero-filled buffer, or None for the grouped layout
    (returns ``[kept, dim]`` in entry order). Backward scatters-adds into x's gradient.
    """
    if not _needs_autograd(x):
        return _dispatch_forward(x, token_index, rows, num_rows)
    return _Dispatch.apply(x, token_index, rows, num_rows)


def combine(
    expert_out: torch.Tensor,
    gates: torch.Tensor,
    token_index: torch.Tensor,
    rows: torch.Tensor | None = None,
    num_tokens: int = 0,
) -> torch.Tensor:
    """Weighted sum of expert outputs back per token.

    expert_out: [num_rows, dim] (padded) or [kept, dim] (grouped, rows None);
    gates: [kept]; token_index: [kept]. Returns [num_tokens, dim]; tokens with no kept
    choice get zeros. One backward produces both the expert-output and the gate gradient.
    """
    if not _needs_autograd(expert_out, gates):
        return _combine_forward(expert_out, gates, token_index, rows, num_tokens)
    return _Combine.apply(expert_out, gates, token_index, rows, num_tokens)
