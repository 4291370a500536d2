"""The exact-count expert kernels (grouped GEMM, per-expert GEMMs) and their ``torch.compile`` form.

Both run the experts on rows sorted by expert with ``counts[e]`` rows for expert e. Their
shapes do not depend on the counts, but their insides do (``grouped_mm`` offsets, a Python loop
over the counts), and ``grouped_mm``'s fake-tensor rule accepts only bfloat16 on every device.
So under ``torch.compile`` they run as one registered custom op, ``flexmoe::exact_count_ffn``:
dynamo and AOTAutograd see its output shape (``[x.shape[0], model_dim]``) and nothing inside.
Its backward is a second op that recomputes the forward with the per-expert kernel and takes its
hand-written backward: compiled training pays one more expert forward for not tracing the kernels.
Eager calls run the kernels directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from flexmoe.ops.per_expert import per_expert_ffn

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
) -> torch.Tensor:
    """Expert FFNs by ``grouped_mm``: x [rows, M] sorted by expert, counts [E] (sums to at most
    rows; the rows past the sum get unspecified values) -> [rows, M]. Weights as
    :class:`~flexmoe.FFNExperts` (w1/w3 [E, M, H], w2 [E, H, M], b1 [E, H], b2 [E, M]) in x's
    dtype; ``gate_up`` [E, M, 2H]: w1 and w3 fused, computed by one GEMM."""
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
    hidden = activation(pre if b1_rows is None else pre + b1_rows)
    if gate_in is not None:
        hidden = hidden * gate_in
    out = F.grouped_mm(hidden, w2, offs=offsets)
    b2_rows = per_row(b2)
    return out if b2_rows is None else out + b2_rows


def _run_kernel(
    kernel: str,
    x: torch.Tensor,
    counts: torch.Tensor,
    token_index: torch.Tensor | None,
    gates: torch.Tensor | None,
    weights: list[torch.Tensor | None],
    activation: str,
) -> torch.Tensor:
    fn = ACTIVATION_FUNCTIONS[activation]
    if kernel == "grouped":
        return grouped_ffn(x, counts, fn, *weights)
    w1, b1, w3, w2, b2 = weights
    return per_expert_ffn(x, counts.tolist(), fn, w1, b1, w3, w2, b2, token_index=token_index, gates=gates)


@torch.library.custom_op("flexmoe::exact_count_ffn", mutates_args=())
def _exact_count_ffn(
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
    kernel: str,
) -> torch.Tensor:
    return _run_kernel(kernel, x, counts, token_index, gates, [w1, b1, w3, w2, b2], activation)


@_exact_count_ffn.register_fake
def _(x, counts, token_index, gates, w1, b1, w3, w2, b2, activation, kernel):
    return x.new_empty(x.shape[0], w2.shape[2])


@torch.library.custom_op("flexmoe::exact_count_ffn_backward", mutates_args=())
def _exact_count_ffn_backward(
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
    activation: str,
    kernel: str,
) -> list[torch.Tensor]:
    """Gradients of (x, gates, w1, b1, w3, w2, b2), an empty tensor for each absent one."""
    differentiable = [x, gates, w1, b1, w3, w2, b2]
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_() for t in differentiable]
        x_, gates_, *weights = leaves
        # The per-expert kernel for both: its autograd.Function records a graph inside this op,
        # where the aten ops of grouped_mm's path would not (the op runs below autograd).
        out = _run_kernel("per_expert", x_, counts, token_index, gates_, weights, activation)
        present = [leaf for leaf in leaves if leaf is not None]
        grads = iter(torch.autograd.grad(out, present, grad_out, allow_unused=True))
    result = []
    for leaf in leaves:
        grad = None if leaf is None else next(grads)
        if grad is None:
            grad = x.new_empty(0) if leaf is None else torch.zeros_like(leaf)
        result.append(grad)
    return result


@_exact_count_ffn_backward.register_fake
def _(grad_out, x, counts, token_index, gates, w1, b1, w3, w2, b2, activation, kernel):
    return [x.new_empty(0) if t is None else torch.empty_like(t) for t in (x, gates, w1, b1, w3, w2, b2)]


def _setup_context(ctx, inputs, output) -> None:
    *tensors, activation, kernel = inputs
    ctx.save_for_backward(*tensors)
    ctx.activation, ctx.kernel = activation, kernel
    ctx.present = [t is not None for t in tensors]


def _backward(ctx, grad_out):
    x, counts, token_index, gates, w1, b1, w3, w2, b2 = ctx.saved_tensors
    grads = _exact_count_ffn_backward(
        grad_out, x, counts, token_index, gates, w1, b1, w3, w2, b2, ctx.activation, ctx.kernel
    )
    grad_x, grad_gates, *grad_weights = grads
    present = ctx.present
    grad_gates = grad_gates if present[3] else None
    grad_weights = [g if present[4 + i] else None for i, g in enumerate(grad_weights)]
    return (grad_x, None, None, grad_gates, *grad_weights, None, None)


_exact_count_ffn.register_autograd(_backward, setup_context=_setup_context)


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
    return _exact_count_ffn(x, counts, token_index, gates, w1, b1, w3, w2, b2, name, kernel)


@torch.compiler.disable
def _eager_outside_graph(kernel, x, counts, activation, w1, b1, w3, w2, b2, token_index, gates):
    if kernel == "grouped":
        return grouped_ffn(x, counts, activation, w1, b1, w3, w2, b2)
    return per_expert_ffn(x, counts.tolist(), activation, w1, b1, w3, w2, b2, token_index=token_index, gates=gates)
