"""The exact-count expert kernels (grouped GEMM, per-expert GEMMs) and their ``torch.compile`` form.

Both run the experts on rows sorted by expert with ``counts[e]`` rows for expert e. Their
shapes do not depend on the counts, but their insides do (``grouped_mm`` offsets, a Python loop
over the counts), and ``grouped_mm``'s fake-tensor rule accepts only bfloat16 on every device.
So under ``torch.compile`` they run as one registered custom op, ``flexmoe::exact_count_ffn``:
dynamo and AOTAutograd see its output shape (``[x.shape[0], model_dim]``) and nothing inside.
When a backward will follow, the op also returns what its backward reads (the pre-activation,
activation and gate input, as [rows, hidden] tensors; the routed per-expert kernel also its
gathered input rows and expert outputs), and its backward is a second op computing the
gradients from them (grouped_mm's for the grouped kernel, the per-expert kernel's hand-written
backward for the per-expert one): no expert GEMM is computed twice.
Eager calls run the kernels directly.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from flexmoe.ops.per_expert import PerExpertFFN, _activation_backward, _Rows, per_expert_ffn

KERNELS = ("grouped", "per_expert")

# Activations the custom op can name (its schema takes a string, not a callable).
ACTIVATION_NAMES: dict[Callable, str] = {F.gelu: "gelu", F.relu: "relu", F.silu: "silu"}
# The built-in activations by name (MoEConfig.activation): the one table of them.
ACTIVATION_FUNCTIONS = {name: fn for fn, name in ACTIVATION_NAMES.items()}


def grouped_ffn(
    x: torch.Tensor,
    counts: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    gate_up: torch.Tensor | None = None,
    saved: list | None = None,
) -> torch.Tensor:
    """Expert FFNs by ``grouped_mm``: x [rows, M] sorted by expert, counts [E] (sums to at most
    rows; the rows past the sum get unspecified values) -> [rows, M]. Weights as
    :class:`~flexmoe.FFNExperts` (w1/w3 [E, M, H], w2 [E, H, M], b1 [E, H], b2 [E, M]) in x's
    dtype; ``gate_up`` [E, M, 2H]: w1 and w3 fused, computed by one GEMM. ``saved``: a list that
    gets the pre-activation (bias included), the activation and the gate input (None when not
    gated), each [rows, H], as the per-expert backward reads them."""
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    hidden_dim = w1.shape[2]
    expert_of_row = None

    def per_row(bias: torch.Tensor | None) -> torch.Tensor | None:
        # A gather rather than repeat_interleave, so that rows past sum(counts) (a static-shape
        # plan's dropped entries, whose results the caller discards) keep the size static. They
        # read an extra zero row: their (unspecified) gradient lands there, not in the bias's.
        nonlocal expert_of_row
        if bias is None:
            return None
        if expert_of_row is None:
            rows = torch.arange(x.shape[0], device=x.device, dtype=offsets.dtype)
            expert_of_row = torch.searchsorted(offsets, rows, right=True)
        return F.pad(bias, (0, 0, 0, 1))[expert_of_row]

    if gate_up is not None:
        both = F.grouped_mm(x, gate_up, offs=offsets)
        pre, gate_in = both[:, :hidden_dim], both[:, hidden_dim:]
    else:
        pre = F.grouped_mm(x, w1, offs=offsets)
        gate_in = None if w3 is None else F.grouped_mm(x, w3, offs=offsets)
    b1_rows = per_row(b1)
    if b1_rows is not None:
        pre = pre + b1_rows
    activated = activation(pre)
    hidden = activated if gate_in is None else activated * gate_in
    out = F.grouped_mm(hidden, w2, offs=offsets)
    b2_rows = per_row(b2)
    out = out if b2_rows is None else out + b2_rows
    if saved is not None:
        saved += [pre, activated, gate_in]
    return out


# The op's outputs after the layer output: what its backward reads, each [entries, ...] (rows of
# x, or entries of token_index when routed), or empty where absent: pre-activation, activation,
# gate input (gated experts), the routed input rows and expert outputs (routed per-expert kernel).
SAVED_PARTS = ("pre", "act", "gate", "x", "y")


def _forward(
    kernel: str,
    x: torch.Tensor,
    counts: torch.Tensor,
    token_index: torch.Tensor | None,
    gates: torch.Tensor | None,
    weights: list[torch.Tensor | None],
    activation: str,
    save: bool,
) -> tuple[torch.Tensor, ...]:
    """The op's forward: (out, *SAVED_PARTS), the parts empty unless ``save``."""
    fn = ACTIVATION_FUNCTIONS[activation]
    if kernel == "grouped":
        saved = [] if save else None
        out = grouped_ffn(x, counts, fn, *weights, saved=saved)
        parts = [None] * 5 if saved is None else [*saved, None, None]
        # A new empty tensor each: the outputs of a custom op may not alias one another.
        return out, *(x.new_empty(0) if part is None else part for part in parts)
    w1, b1, w3, w2, b2 = weights
    counts_list = counts.tolist()
    entries = x.shape[0] if token_index is None else token_index.shape[0]
    rows_out = _Slices(counts_list, entries) if save else None
    out, _ = PerExpertFFN.forward(x.contiguous(), counts_list, fn, rows_out, token_index, gates, w1, b1, w3, w2, b2)
    parts = rows_out.parts if save else {}
    return out, *(parts[name] if name in parts else x.new_empty(0) for name in SAVED_PARTS)


class _Slices(_Rows):
    """Where the per-expert forward writes what backward reads: expert e's rows of one
    ``[entries, cols]`` tensor per part (temporaries are allocated as usual)."""

    def __init__(self, counts: list[int], entries: int) -> None:
        super().__init__(None)
        self.entries, self.parts = entries, {}
        self.starts = [sum(counts[:e]) for e in range(len(counts))]

    def __call__(self, name: object, rows: int, like: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(name, tuple):
            return None
        part, e = name
        if part not in self.parts:
            self.parts[part] = like.new_empty(self.entries, like.shape[-1])
        start = self.starts[e]
        return self.parts[part][start : start + rows]


@torch.library.custom_op("flexmoe::exact_count_ffn", mutates_args=())
def _exact_count_ffn(
    kernel: str,
    x: torch.Tensor,
    counts: torch.Tensor,
    token_index: torch.Tensor | None,
    gates: torch.Tensor | None,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(kernel, x, counts, token_index, gates, [w1, b1, w3, w2, b2], activation, save)


@_exact_count_ffn.register_fake
def _(kernel, x, counts, token_index, gates, w1, b1, w3, w2, b2, activation, save):
    out = x.new_empty(x.shape[0], w2.shape[2])
    entries = x.shape[0] if token_index is None else token_index.shape[0]
    hidden_dim = w1.shape[2]

    def part(present: bool, cols: int) -> torch.Tensor:
        return x.new_empty(entries, cols) if save and present else x.new_empty(0)

    routed = token_index is not None and kernel == "per_expert"
    return (
        out,
        part(True, hidden_dim),
        part(True, hidden_dim),
        part(w3 is not None, hidden_dim),
        part(routed, x.shape[1]),
        part(routed, w2.shape[2]),
    )


@torch.library.custom_op("flexmoe::exact_count_ffn_backward", mutates_args=())
def _exact_count_ffn_backward(
    kernel: str,
    grad_out: torch.Tensor,
    x: torch.Tensor,
    counts: torch.Tensor,
    token_index: torch.Tensor | None,
    gates: torch.Tensor | None,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    pre: torch.Tensor,
    act: torch.Tensor,
    gate: torch.Tensor,
    x_rows: torch.Tensor,
    y: torch.Tensor,
    activation: str,
) -> list[torch.Tensor]:
    """Gradients of (x, gates, w1, b1, w3, w2, b2), an empty tensor for each absent one, from
    the parts the forward saved (no recompute): grouped_mm's for the grouped kernel, the
    per-expert kernel's hand-written backward for the per-expert one."""
    if kernel == "grouped":
        grads = _grouped_backward(grad_out, x, counts, w1, b1, w3, w2, b2, pre, act, gate, activation)
        return [x.new_empty(0) if g is None else g for g in grads]
    counts_list = counts.tolist()
    routed = token_index is not None
    saved = []
    start = 0
    for count in counts_list:
        if count == 0:
            continue
        rows = slice(start, start + count)
        saved += [x_rows[rows], y[rows]] if routed else []
        saved += [pre[rows], act[rows]] + ([gate[rows]] if w3 is not None else [])
        start += count
    ctx = SimpleNamespace(
        saved_tensors=(x, token_index, gates, w1, b1, w3, w2, b2, *saved),
        needs_input_grad=(
            True,
            False,
            False,
            False,
            False,
            gates is not None,
            *(t is not None for t in (w1, b1, w3, w2, b2)),
        ),
        counts=counts_list,
        activation=ACTIVATION_FUNCTIONS[activation],
        cache=None,
    )
    grads = PerExpertFFN.backward.__wrapped__(ctx, grad_out)  # the plain function, below autograd
    grad_x, grad_gates, *grad_weights = grads[0], grads[5], *grads[6:]
    return [x.new_empty(0) if g is None else g for g in (grad_x, grad_gates, *grad_weights)]


def _grouped_backward(grad_out, x, counts, w1, b1, w3, w2, b2, pre, act, gate, activation):
    """The grouped kernel's gradients of (x, gates=None, w1, b1, w3, w2, b2) by grouped_mm, as
    autograd through :func:`grouped_ffn` computes them, from the saved pre-activation, activation
    and gate input. Rows past ``sum(counts)`` get unspecified input gradients (the caller
    discards them) and add nothing to the weights' and biases' gradients."""
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    num_experts = counts.numel()
    rows = torch.arange(x.shape[0], device=x.device, dtype=offsets.dtype)
    expert_of_row = torch.searchsorted(offsets, rows, right=True)  # num_experts past sum(counts)

    def per_expert_sum(grad_rows: torch.Tensor) -> torch.Tensor:  # [rows, n] -> [E, n]
        sums = grad_rows.new_zeros(num_experts + 1, grad_rows.shape[1])
        return sums.index_add_(0, expert_of_row, grad_rows)[:num_experts]

    gated = w3 is not None
    hidden = act * gate if gated else act
    grad_w2 = F.grouped_mm(hidden.t(), grad_out, offs=offsets)
    grad_b2 = None if b2 is None else per_expert_sum(grad_out)
    grad_hidden = F.grouped_mm(grad_out, w2.transpose(1, 2), offs=offsets)
    grad_gate = grad_hidden * act if gated else None
    grad_act = grad_hidden * gate if gated else grad_hidden
    grad_pre = _activation_backward(ACTIVATION_FUNCTIONS[activation], pre, grad_act)
    x_t = x.t()
    grad_w1 = F.grouped_mm(x_t, grad_pre, offs=offsets)
    grad_b1 = None if b1 is None else per_expert_sum(grad_pre)
    grad_w3 = F.grouped_mm(x_t, grad_gate, offs=offsets) if gated else None
    grad_x = F.grouped_mm(grad_pre, w1.transpose(1, 2), offs=offsets)
    if gated:
        grad_x = grad_x + F.grouped_mm(grad_gate, w3.transpose(1, 2), offs=offsets)
    return grad_x, None, grad_w1, grad_b1, grad_w3, grad_w2, grad_b2


@_exact_count_ffn_backward.register_fake
def _(kernel, grad_out, x, counts, token_index, gates, w1, b1, w3, w2, b2, pre, act, gate, x_rows, y, activation):
    return [x.new_empty(0) if t is None else torch.empty_like(t) for t in (x, gates, w1, b1, w3, w2, b2)]


def _setup_context(ctx, inputs, output) -> None:
    kernel, *tensors, activation, _save = inputs
    _, *parts = output
    ctx.save_for_backward(*tensors, *parts)
    ctx.activation, ctx.kernel = activation, kernel
    ctx.present = [t is not None for t in tensors]


def _backward(ctx, grad_out, *_grad_parts):
    x, counts, token_index, gates, w1, b1, w3, w2, b2, *parts = ctx.saved_tensors
    if parts[0].numel() == 0 and x.shape[0] > 0:
        raise RuntimeError("flexmoe::exact_count_ffn ran without save=True: it has no backward")
    grads = _exact_count_ffn_backward(
        ctx.kernel, grad_out.contiguous(), x, counts, token_index, gates, w1, b1, w3, w2, b2, *parts, ctx.activation
    )
    grad_x, grad_gates, *grad_weights = grads
    present = ctx.present
    grad_gates = grad_gates if present[3] else None
    grad_weights = [g if present[4 + i] else None for i, g in enumerate(grad_weights)]
    return (None, grad_x, None, None, grad_gates, *grad_weights, None, None)


_exact_count_ffn.register_autograd(_backward, setup_context=_setup_context)

# The same kernels when no backward follows (eval, no_grad, frozen weights), as an op with no
# autograd kernel: a custom_op's Python wrapping costs ~150 us a call (benchmarks/op_overhead.py),
# a plain op without autograd ~30 us, which at decode sizes decides whether compiling pays.
_LIBRARY = torch.library.Library("flexmoe", "FRAGMENT")
_LIBRARY.define(
    "exact_count_ffn_no_grad(str kernel, Tensor x, Tensor counts, Tensor? token_index, Tensor? gates, "
    "Tensor w1, Tensor? b1, Tensor? w3, Tensor w2, Tensor? b2, str activation) -> Tensor"
)


def _no_grad_forward(kernel, x, counts, token_index, gates, w1, b1, w3, w2, b2, activation):
    return _forward(kernel, x, counts, token_index, gates, [w1, b1, w3, w2, b2], activation, False)[0]


_LIBRARY.impl("exact_count_ffn_no_grad", _no_grad_forward, "CompositeExplicitAutograd")


@torch.library.register_fake("flexmoe::exact_count_ffn_no_grad")
def _(kernel, x, counts, token_index, gates, w1, b1, w3, w2, b2, activation):
    return x.new_empty(x.shape[0], w2.shape[2])


def exact_count_ffn(
    kernel: str,
    x: torch.Tensor,
    counts: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    token_index: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``kernel`` (``"grouped"`` or ``"per_expert"``) as the ``flexmoe::exact_count_ffn`` op,
    for ``torch.compile``. x [rows, M] sorted by expert (or, per_expert with ``token_index`` and
    ``gates`` [kept], the layer's [tokens, M] input), counts [E] int -> [x.shape[0], M].
    A callable activation other than gelu/relu/silu cannot be named in the op's schema: it runs
    the kernel outside the graph (a graph break)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    name = ACTIVATION_NAMES.get(activation)
    if name is None:
        return _eager_outside_graph(kernel, x, counts, activation, w1, b1, w3, w2, b2, token_index, gates)
    differentiable = [t for t in (x, gates, w1, b1, w3, w2, b2) if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)):
        return torch.ops.flexmoe.exact_count_ffn_no_grad(
            kernel, x, counts, token_index, gates, w1, b1, w3, w2, b2, name
        )
    return _exact_count_ffn(kernel, x, counts, token_index, gates, w1, b1, w3, w2, b2, name, True)[0]


@torch.compiler.disable
def _eager_outside_graph(kernel, x, counts, activation, w1, b1, w3, w2, b2, token_index, gates):
    if kernel == "grouped":
        return grouped_ffn(x, counts, activation, w1, b1, w3, w2, b2)
    return per_expert_ffn(x, counts.tolist(), activation, w1, b1, w3, w2, b2, token_index=token_index, gates=gates)
