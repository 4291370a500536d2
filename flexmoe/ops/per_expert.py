"""One GEMM pair per expert on rows sorted by expert, with a hand-written backward.

Autograd through ``w.unbind()`` / ``x.split()`` would stack the per-expert weight gradients
back into ``[E, ...]`` with one large ``cat`` per parameter (measured at ~9% of a 64-expert
layer's forward+backward on CPU) and concatenate the row pieces again. Here every GEMM writes
straight into its slice of a preallocated output or gradient (``out=``), so nothing is
copied.

The built-in activations (gelu, relu, silu) use their aten backward kernels directly; any other
callable activation gets its derivative from autograd on a recomputed piece. The function is
differentiable once (a second derivative raises).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# activation -> (grad of its output, its input) -> grad of its input, for the built-in ones.
_DERIVATIVES: dict[Callable, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    F.gelu: lambda grad, pre: torch.ops.aten.gelu_backward(grad, pre),
    F.silu: lambda grad, pre: torch.ops.aten.silu_backward(grad, pre),
    F.relu: lambda grad, pre: torch.where(pre > 0, grad, 0),
}


def _activation_backward(activation: Callable, pre: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of ``activation(pre)``'s input given its output's gradient ``grad``."""
    derivative = _DERIVATIVES.get(activation)
    if derivative is not None:
        return derivative(grad, pre)
    with torch.enable_grad():  # any other callable: autograd on a recomputed piece
        leaf = pre.detach().requires_grad_()
        return torch.autograd.grad(activation(leaf), leaf, grad)[0]


class PerExpertFFN(torch.autograd.Function):
    """``y[rows of e] = hidden_e @ w2[e] + b2[e]``, ``hidden_e = act(x_e @ w1[e] + b1[e])``
    (times ``x_e @ w3[e]`` when gated), for rows sorted by expert with ``counts[e]`` rows each.
    Shapes: x [rows, M], w1/w3 [E, M, H], b1 [E, H], w2 [E, H, M], b2 [E, M] (w3, b1, b2 may be
    None); all of x's dtype.

    Saved for backward: per expert, its pre-activation, activation and gate input, each its own
    tensor (what autograd would keep): one ``[rows, H]`` buffer for all experts would be a large
    allocation that glibc serves with fresh pages on every call (page faults cost as much as
    the elementwise work at 64 MB)."""

    @staticmethod
    def forward(ctx, x, counts, activation, w1, b1, w3, w2, b2):
        out = x.new_empty(x.shape[0], w2.shape[2])
        saved, start = [], 0
        with torch.autocast(x.device.type, enabled=False):
            for e, count in enumerate(counts):
                if count == 0:
                    continue
                end = start + count
                piece = x[start:end]
                pre = piece @ w1[e] if b1 is None else torch.addmm(b1[e], piece, w1[e])
                activated = activation(pre)
                gate_in = None if w3 is None else piece @ w3[e]
                hidden = activated if gate_in is None else activated * gate_in
                if b2 is None:
                    torch.mm(hidden, w2[e], out=out[start:end])
                else:
                    torch.addmm(b2[e], hidden, w2[e], out=out[start:end])
                saved += [pre, activated] if gate_in is None else [pre, activated, gate_in]
                start = end
        ctx.counts, ctx.activation = counts, activation
        ctx.save_for_backward(x, w1, b1, w3, w2, b2, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w1, b1, w3, w2, b2, *saved = ctx.saved_tensors
        needs = ctx.needs_input_grad
        want_x, want_w1, want_b1, want_w3, want_w2, want_b2 = needs[0], *needs[3:]
        grad_out = grad_out.contiguous()

        def buffer(like: torch.Tensor | None, wanted: bool) -> torch.Tensor | None:
            # Experts with no rows keep a zero gradient; the others' slices are overwritten.
            if like is None or not wanted:
                return None
            return torch.zeros_like(like) if 0 in ctx.counts else torch.empty_like(like)

        gx = torch.empty_like(x) if want_x else None
        gw1, gb1, gw3 = buffer(w1, want_w1), buffer(b1, want_b1), buffer(w3, want_w3)
        gw2, gb2 = buffer(w2, want_w2), buffer(b2, want_b2)
        per_expert = 2 if w3 is None else 3
        start, index = 0, 0
        with torch.autocast(x.device.type, enabled=False):
            for e, count in enumerate(ctx.counts):
                if count == 0:
                    continue
                end = start + count
                pre, activated, *gate = saved[index : index + per_expert]
                gate_in = gate[0] if gate else None
                index += per_expert
                piece, grad = x[start:end], grad_out[start:end]
                hidden = activated if gate_in is None else activated * gate_in
                if gw2 is not None:
                    torch.mm(hidden.t(), grad, out=gw2[e])
                if gb2 is not None:
                    torch.sum(grad, 0, out=gb2[e])
                grad_hidden = grad @ w2[e].t()
                grad_gate = None
                if gate_in is not None:
                    grad_gate = grad_hidden * activated
                    grad_hidden = grad_hidden * gate_in
                grad_pre = _activation_backward(ctx.activation, pre, grad_hidden)
                if gw1 is not None:
                    torch.mm(piece.t(), grad_pre, out=gw1[e])
                if gb1 is not None:
                    torch.sum(grad_pre, 0, out=gb1[e])
                if gw3 is not None:
                    torch.mm(piece.t(), grad_gate, out=gw3[e])
                if gx is not None:
                    torch.mm(grad_pre, w1[e].t(), out=gx[start:end])
                    if grad_gate is not None:
                        gx[start:end].addmm_(grad_gate, w3[e].t())
                start = end
        return gx, None, None, gw1, gb1, gw3, gw2, gb2


def per_expert_ffn(
    x: torch.Tensor,
    counts: list[int],
    activation: Callable[[torch.Tensor], torch.Tensor],
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
) -> torch.Tensor:
    """See :class:`PerExpertFFN`. x: [rows, M] sorted by expert, ``sum(counts) == rows``."""
    if sum(counts) != x.shape[0]:
        raise ValueError(f"counts must sum to the {x.shape[0]} rows of x, got {sum(counts)}")
    return PerExpertFFN.apply(x.contiguous(), counts, activation, w1, b1, w3, w2, b2)
