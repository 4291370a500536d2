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

from flexmoe.ops.grad_buffers import GradientBuffers

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

    With ``token_index`` and ``gates`` it also dispatches and combines, expert by expert:
    x is then the layer's ``[tokens, M]`` input, expert e's rows are ``x[token_index[rows of
    e]]``, and the output is ``[tokens, M]``, each token the sum of its kept choices' outputs
    times their gates (``gates`` [kept], differentiable). Gathering and scattering one expert's
    rows at a time keeps every temporary small: the separate dispatch buffer, expert output and
    weighted copy are each ``[kept, M]``, which glibc serves from fresh pages (a page fault per
    4 KB) once they pass its mmap threshold.

    Saved for backward: per expert, its input rows (routed), pre-activation, activation, gate
    input and output (routed, for the gate gradient), each its own tensor (what autograd would
    keep): one ``[rows, H]`` buffer for all experts would be a large allocation that glibc serves
    with fresh pages on every call (page faults cost as much as the elementwise work at 64 MB)."""

    @staticmethod
    def forward(ctx, x, counts, activation, grad_buffers, token_index, gates, w1, b1, w3, w2, b2):
        routed = token_index is not None
        out = x.new_zeros(x.shape[0], w2.shape[2]) if routed else x.new_empty(x.shape[0], w2.shape[2])
        gate_rows = gates.to(x.dtype).unsqueeze(1) if routed else None
        saved, start = [], 0
        with torch.autocast(x.device.type, enabled=False):
            for e, count in enumerate(counts):
                if count == 0:
                    continue
                end = start + count
                piece = x.index_select(0, token_index[start:end]) if routed else x[start:end]
                pre = piece @ w1[e] if b1 is None else torch.addmm(b1[e], piece, w1[e])
                activated = activation(pre)
                gate_in = None if w3 is None else piece @ w3[e]
                hidden = activated if gate_in is None else activated * gate_in
                if routed:
                    y = hidden @ w2[e] if b2 is None else torch.addmm(b2[e], hidden, w2[e])
                    out.index_add_(0, token_index[start:end], y * gate_rows[start:end])
                    saved += [piece, y]
                elif b2 is None:
                    torch.mm(hidden, w2[e], out=out[start:end])
                else:
                    torch.addmm(b2[e], hidden, w2[e], out=out[start:end])
                saved += [pre, activated] if gate_in is None else [pre, activated, gate_in]
                start = end
        ctx.counts, ctx.activation, ctx.grad_buffers = counts, activation, grad_buffers
        ctx.save_for_backward(x, token_index, gates, w1, b1, w3, w2, b2, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, token_index, gates, w1, b1, w3, w2, b2, *saved = ctx.saved_tensors
        routed = token_index is not None
        needs = ctx.needs_input_grad
        want_x, want_gates = needs[0], needs[5]
        want_w1, want_b1, want_w3, want_w2, want_b2 = needs[6:]
        grad_out = grad_out.contiguous()
        empty_experts = [e for e, count in enumerate(ctx.counts) if count == 0]

        def buffer(name: str, like: torch.Tensor | None, wanted: bool) -> torch.Tensor | None:
            # Every busy expert's slice is overwritten below; experts with no rows get zeros.
            if like is None or not wanted:
                return None
            grad = torch.empty_like(like) if ctx.grad_buffers is None else ctx.grad_buffers.take(name, like)
            for e in empty_experts:
                grad[e].zero_()
            return grad

        gx = None
        if want_x:
            gx = torch.zeros_like(x) if routed else torch.empty_like(x)
        gw1, gb1, gw3 = buffer("w1", w1, want_w1), buffer("b1", b1, want_b1), buffer("w3", w3, want_w3)
        gw2, gb2 = buffer("w2", w2, want_w2), buffer("b2", b2, want_b2)
        grad_gates = torch.empty_like(gates) if routed and want_gates else None
        gate_rows = gates.to(x.dtype).unsqueeze(1) if routed else None
        per_expert = (2 if w3 is None else 3) + (2 if routed else 0)
        start, index = 0, 0
        with torch.autocast(x.device.type, enabled=False):
            for e, count in enumerate(ctx.counts):
                if count == 0:
                    continue
                end = start + count
                pieces = saved[index : index + per_expert]
                index += per_expert
                if routed:
                    piece, y, pre, activated, *gate = pieces
                    rows = token_index[start:end]
                    grad = grad_out.index_select(0, rows)
                    if grad_gates is not None:
                        _row_dots(grad, y, out=grad_gates[start:end])
                    grad.mul_(gate_rows[start:end])
                else:
                    pre, activated, *gate = pieces
                    piece, grad = x[start:end], grad_out[start:end]
                gate_in = gate[0] if gate else None
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
                    # Routed: this expert's rows of the input gradient, added at their tokens.
                    grad_piece = torch.mm(grad_pre, w1[e].t(), out=None if routed else gx[start:end])
                    if grad_gate is not None:
                        grad_piece.addmm_(grad_gate, w3[e].t())
                    if routed:
                        gx.index_add_(0, rows, grad_piece)
                start = end
        return gx, None, None, None, None, grad_gates, gw1, gb1, gw3, gw2, gb2


def _row_dots(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = a[i] . b[i], accumulated in out's dtype (float32 gates for half-precision rows)."""
    if a.dtype == out.dtype:
        torch.linalg.vecdot(a, b, out=out)
    else:
        torch.sum(a * b, dim=1, dtype=out.dtype, out=out)


def per_expert_ffn(
    x: torch.Tensor,
    counts: list[int],
    activation: Callable[[torch.Tensor], torch.Tensor],
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    grad_buffers: GradientBuffers | None = None,
    *,
    token_index: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :class:`PerExpertFFN`. Without routing: x [rows, M] sorted by expert,
    ``sum(counts) == rows`` -> [rows, M]. With ``token_index`` and ``gates`` ([kept], sorted by
    expert, ``sum(counts) == kept``): x [tokens, M] -> [tokens, M], dispatch and combine included.
    grad_buffers: where the weight gradients are allocated (reused across backward passes);
    None allocates new ones each time."""
    if (token_index is None) != (gates is None):
        raise ValueError("token_index and gates go together: pass both or neither")
    rows = x.shape[0] if token_index is None else token_index.shape[0]
    if sum(counts) != rows:
        what = "rows of x" if token_index is None else "entries of token_index"
        raise ValueError(f"counts must sum to the {rows} {what}, got {sum(counts)}")
    return PerExpertFFN.apply(x.contiguous(), counts, activation, grad_buffers, token_index, gates, w1, b1, w3, w2, b2)
