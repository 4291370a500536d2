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

from flexmoe.ops.buffers import BufferCache

# Row buffers from this size up come from the cache (see flexmoe.ops.buffers); smaller ones are
# cheap to allocate.
REUSE_MIN_BYTES = 1 << 20

# activation -> (its input, out) -> its output written into ``out``, for the built-in ones.
_ACTIVATIONS_INTO: dict[Callable, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    F.gelu: lambda pre, out: torch.ops.aten.gelu.out(pre, out=out),
    F.silu: lambda pre, out: torch.ops.aten.silu.out(pre, out=out),
    F.relu: lambda pre, out: torch.clamp_min(pre, 0, out=out),
}

# activation -> (grad of its output, its input, out) -> grad of its input written into ``out``
# (which may be ``grad`` itself), for the built-in ones.
_DERIVATIVES_INTO: dict[Callable, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    F.gelu: lambda grad, pre, out: torch.ops.aten.gelu_backward.grad_input(grad, pre, grad_input=out),
    F.silu: lambda grad, pre, out: torch.ops.aten.silu_backward.grad_input(grad, pre, grad_input=out),
    F.relu: lambda grad, pre, out: torch.where(pre > 0, grad, grad.new_zeros(()), out=out),
}


def _activate(activation: Callable, pre: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``activation(pre)``, written into ``out`` when given and the activation is a built-in one."""
    into = _ACTIVATIONS_INTO.get(activation)
    return activation(pre) if into is None or out is None else into(pre, out)


def _activation_backward(
    activation: Callable, pre: torch.Tensor, grad: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The gradient of ``activation(pre)``'s input given its output's gradient ``grad``; built-in
    activations write it into ``out``, or over ``grad`` (which the caller no longer needs) when
    ``out`` is None."""
    derivative = _DERIVATIVES_INTO.get(activation)
    if derivative is not None:
        return derivative(grad, pre, grad if out is None else out)
    with torch.enable_grad():  # any other callable: autograd on a recomputed piece
        leaf = pre.detach().requires_grad_()
        return torch.autograd.grad(activation(leaf), leaf, grad)[0]


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """``x @ w + b`` (``b`` may be None), written into ``out`` when given."""
    return torch.mm(x, w, out=out) if b is None else torch.addmm(b, x, w, out=out)


def _hidden(activated: torch.Tensor, gate_in: torch.Tensor | None, rows_out: _Rows, rows: int) -> torch.Tensor:
    """The expert's hidden rows: the activation, times the gate input for a gated expert (into a
    reused temporary)."""
    return activated if gate_in is None else torch.mul(activated, gate_in, out=rows_out("h", rows, activated))


class _Rows:
    """Where a large ``[rows, cols]`` result goes: a reused buffer of the cache (``None``, so that
    the op allocates, for small results or without a cache)."""

    def __init__(self, cache: BufferCache | None) -> None:
        self.cache = cache

    def __call__(self, name: object, rows: int, like: torch.Tensor) -> torch.Tensor | None:
        if self.cache is None or rows * like.shape[-1] * like.element_size() < REUSE_MIN_BYTES:
            return None
        return self.cache.take_rows(name, rows, like)


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
    weighted copy are each ``[kept, M]``.

    Saved for backward: per expert, its input rows (routed), pre-activation, activation, gate
    input and output (routed, for the gate gradient), each its own tensor (what autograd would
    keep). With a ``cache`` (training), the large ones (from ``REUSE_MIN_BYTES``) and the large
    temporaries of both passes live in buffers reused from step to step, as are the weight
    gradients: on CPU, fresh large allocations are fresh pages, a page fault per 4 KB
    (:mod:`flexmoe.ops.buffers`)."""

    @staticmethod
    def forward(x, counts, activation, cache, token_index, gates, w1, b1, w3, w2, b2):
        routed = token_index is not None
        out = x.new_zeros(x.shape[0], w2.shape[2]) if routed else x.new_empty(x.shape[0], w2.shape[2])
        gate_rows = gates.to(x.dtype).unsqueeze(1) if routed else None
        rows_out = cache if isinstance(cache, _Rows) else _Rows(cache)
        saved, start = [], 0
        with torch.autocast(x.device.type, enabled=False):
            for e, count in enumerate(counts):
                if count == 0:
                    continue
                end = start + count
                if routed:
                    piece = torch.index_select(x, 0, token_index[start:end], out=rows_out(("x", e), count, x))
                else:
                    piece = x[start:end]
                pre = _linear(piece, w1[e], None if b1 is None else b1[e], rows_out(("pre", e), count, w1[e]))
                activated = _activate(activation, pre, rows_out(("act", e), count, w1[e]))
                gate_in = None if w3 is None else torch.mm(piece, w3[e], out=rows_out(("gate", e), count, w3[e]))
                hidden = (
                    activated if gate_in is None else torch.mul(activated, gate_in, out=rows_out("h", count, w1[e]))
                )
                if routed:
                    y = _linear(hidden, w2[e], None if b2 is None else b2[e], rows_out(("y", e), count, w2[e]))
                    weighted = torch.mul(y, gate_rows[start:end], out=rows_out("weighted", count, y))
                    out.index_add_(0, token_index[start:end], weighted)
                    del weighted  # frees the cached buffer for the next expert
                    saved += [piece, y]
                else:
                    _linear(hidden, w2[e], None if b2 is None else b2[e], out[start:end])
                del hidden
                saved += [pre, activated] if gate_in is None else [pre, activated, gate_in]
                start = end
            if not routed:
                out[start:].zero_()  # rows past sum(counts) (a static-shape plan's dropped entries)
        # Handed to setup_context (torch.func's form: no ctx in forward); not part of the result.
        return out, saved

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, counts, activation, cache, token_index, gates, w1, b1, w3, w2, b2 = inputs
        _, saved = output
        ctx.counts, ctx.activation, ctx.cache = counts, activation, cache
        ctx.save_for_backward(x, token_index, gates, w1, b1, w3, w2, b2, *saved)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_saved=None):
        x, token_index, gates, w1, b1, w3, w2, b2, *saved = ctx.saved_tensors
        routed = token_index is not None
        needs = ctx.needs_input_grad
        want_x, want_gates = needs[0], needs[5]
        want_w1, want_b1, want_w3, want_w2, want_b2 = needs[6:]
        grad_out = grad_out.contiguous()
        empty_experts = [e for e, count in enumerate(ctx.counts) if count == 0]
        cache = ctx.cache
        rows_out = _Rows(cache)

        def buffer(name: str, like: torch.Tensor | None, wanted: bool) -> torch.Tensor | None:
            # Every busy expert's slice is overwritten below; experts with no rows get zeros.
            if like is None or not wanted:
                return None
            grad = torch.empty_like(like) if cache is None else cache.take(name, like, grad_of=like)
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
                    grad = torch.index_select(grad_out, 0, rows, out=rows_out("grad", count, grad_out))
                    if grad_gates is not None:
                        _row_dots(grad, y, out=grad_gates[start:end])
                    grad.mul_(gate_rows[start:end])
                else:
                    pre, activated, *gate = pieces
                    piece, grad = x[start:end], grad_out[start:end]
                gate_in = gate[0] if gate else None
                if gw2 is not None:
                    hidden = (
                        activated if gate_in is None else torch.mul(activated, gate_in, out=rows_out("h", count, pre))
                    )
                    torch.mm(hidden.t(), grad, out=gw2[e])
                    del hidden
                if gb2 is not None:
                    torch.sum(grad, 0, out=gb2[e])
                grad_hidden = torch.mm(grad, w2[e].t(), out=rows_out("grad_h", count, pre))
                del grad
                grad_gate = None
                if gate_in is not None:
                    grad_gate = torch.mul(grad_hidden, activated, out=rows_out("grad_gate", count, pre))
                    grad_hidden.mul_(gate_in)
                # Into the [rows, H] temporary (free again here), not over its input: written in place,
                # gelu_backward took ~35% more CPU time (one E8 step: 30 ms against 22 ms).
                grad_pre = _activation_backward(ctx.activation, pre, grad_hidden, rows_out("h", count, pre))
                del grad_hidden
                if gw1 is not None:
                    torch.mm(piece.t(), grad_pre, out=gw1[e])
                if gb1 is not None:
                    torch.sum(grad_pre, 0, out=gb1[e])
                if gw3 is not None:
                    torch.mm(piece.t(), grad_gate, out=gw3[e])
                if gx is not None:
                    # Routed: this expert's rows of the input gradient, added at their tokens.
                    grad_piece = torch.mm(
                        grad_pre, w1[e].t(), out=rows_out("grad_x", count, x) if routed else gx[start:end]
                    )
                    if grad_gate is not None:
                        grad_piece.addmm_(grad_gate, w3[e].t())
                    if routed:
                        gx.index_add_(0, rows, grad_piece)
                    del grad_piece
                del grad_pre, grad_gate
                start = end
            # Entries past sum(counts): no gradient.
            if gx is not None and not routed:
                gx[start:].zero_()
            if grad_gates is not None:
                grad_gates[start:].zero_()
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
    cache: BufferCache | None = None,
    *,
    token_index: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :class:`PerExpertFFN`. Without routing: x [rows, M] sorted by expert,
    ``sum(counts) == rows`` -> [rows, M]. With ``token_index`` and ``gates`` ([kept], sorted by
    expert, ``sum(counts) == kept``): x [tokens, M] -> [tokens, M], dispatch and combine included.
    Rows (entries) past ``sum(counts)``, as a static-shape plan's dropped entries, are ignored:
    zero output and zero gradient.
    cache: where the weight gradients and, when this call records a backward, the large
    activations and temporaries are allocated (reused from step to step, see
    :mod:`flexmoe.ops.buffers`); None allocates new ones each time."""
    if (token_index is None) != (gates is None):
        raise ValueError("token_index and gates go together: pass both or neither")
    rows = x.shape[0] if token_index is None else token_index.shape[0]
    if sum(counts) > rows:
        what = "rows of x" if token_index is None else "entries of token_index"
        raise ValueError(f"counts must sum to at most the {rows} {what}, got {sum(counts)}")
    tensors = [t for t in (x, gates, w1, b1, w3, w2, b2) if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        cache = None  # nothing is saved for a backward: the temporaries die within the call
    if cache is not None:
        cache.new_step()
    return PerExpertFFN.apply(x.contiguous(), counts, activation, cache, token_index, gates, w1, b1, w3, w2, b2)[0]
