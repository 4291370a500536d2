"""Batched FFN experts and the custom-expert protocol.

A custom expert module maps ``[local_experts, capacity, model_dim]`` to the same shape
(the padded layout). The built-in :class:`FFNExperts` can also run on the grouped layout:
rows sorted by expert with exact counts, via ``torch.nn.functional.grouped_mm``, so no
compute is spent on empty slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from flexmoe.ops.buffers import BufferCache
from flexmoe.ops.exact_count import ACTIVATION_FUNCTIONS as _ACTIVATIONS
from flexmoe.ops.exact_count import exact_count_ffn, grouped_ffn
from flexmoe.ops.per_expert import per_expert_ffn

# grouped_mm refuses float64; expert_kernel="auto" runs those dtypes per expert (exact counts).
GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# expert_kernel="auto" on CPU: from this many rows per busy expert on average, one plain GEMM pair per
# expert beats CPU grouped_mm (benchmarks/layer.py measures both); below it, the per-expert loop's
# overhead dominates. Measured fwd+bwd on Mixtral-style bias-free gated experts (model 128-512):
# per_expert 1-11% slower than grouped at 32-64 rows, even at 128, ahead from 256 up.
PER_EXPERT_MIN_ROWS = 128


def resolve_activation(activation: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    if callable(activation):
        return activation
    try:
        return _ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)} or a callable, got {activation!r}") from None


class FFNExperts(nn.Module):
    """``num_experts`` independent FFNs ``act(x @ w1 + b1) @ w2 + b2`` stored as batched weights.

    Parameters: w1 [E, model_dim, hidden_dim], b1 [E, hidden_dim], w2 [E, hidden_dim, model_dim],
    b2 [E, model_dim]; with ``gated`` also w3 [E, model_dim, hidden_dim] and the hidden
    activation becomes ``act(x @ w1 + b1) * (x @ w3)`` (SwiGLU with silu).
    """

    def __init__(
        self,
        num_experts: int,
        model_dim: int,
        hidden_dim: int,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "gelu",
        bias: bool = True,
        gated: bool = False,
        *,
        init_hidden_dim: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.model_dim, self.hidden_dim = num_experts, model_dim, hidden_dim
        # A hidden-dim shard of a larger expert initialises w2 with the full expert's fan-in.
        self.init_hidden_dim = init_hidden_dim or hidden_dim
        self.activation = resolve_activation(activation)
        self.w1 = nn.Parameter(torch.empty(num_experts, model_dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, model_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, model_dim, hidden_dim)) if gated else None
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden_dim)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, model_dim)) if bias else None
        # The per-expert kernel's weight gradients and large activations, reused from one step to
        # the next (see flexmoe.ops.buffers; ``self.buffer_cache.clear()`` frees them).
        self.buffer_cache = BufferCache()
        self.reset_parameters(generator)
        self.register_state_dict_post_hook(_standalone_weights)

    def train(self, mode: bool = True) -> FFNExperts:
        """``nn.Module.train``; switching to eval also frees the training buffers (``buffer_cache``)."""
        if not mode:
            self.buffer_cache.clear()
        return super().train(mode)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Weights uniform in ``+-1 / sqrt(fan_in)`` per expert, biases zero (also after building
        on the meta device and ``to_empty``)."""
        # Same scale as nn.Linear's default for each expert (uniform in +-1/sqrt(fan_in)).
        fan_ins = ((self.w1, self.model_dim), (self.w2, self.init_hidden_dim), (self.w3, self.model_dim))
        for weight, fan_in in fan_ins:
            if weight is not None:
                nn.init.uniform_(weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator)
        for bias in (self.b1, self.b2):
            if bias is not None:
                nn.init.zeros_(bias)

    def expert_parameters(self) -> dict[str, torch.Tensor]:
        """The parameters present (w1, w2 and, if enabled, w3, b1, b2) by name."""
        names = ("w1", "w3", "b1", "w2", "b2")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Padded layout. x: [E, capacity, model_dim] -> [E, capacity, model_dim]."""
        return self.forward_with(x, self.expert_parameters())

    def forward_with(self, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Padded layout with given weights (e.g. gathered from other ranks), named as
        :meth:`expert_parameters`. x: [n, rows, model_dim], w1 [n, model_dim, h], w2 [n, h, model_dim]
        -> [n, rows, model_dim]."""
        w3, b1, b2 = weights.get("w3"), weights.get("b1"), weights.get("b2")
        hidden = self._hidden(
            torch.bmm(x, weights["w1"].to(x.dtype)),
            None if w3 is None else torch.bmm(x, w3.to(x.dtype)),
            None if b1 is None else b1.to(x.dtype).unsqueeze(1),
        )
        out = torch.bmm(hidden, weights["w2"].to(x.dtype))
        return out if b2 is None else out + b2.to(x.dtype).unsqueeze(1)

    def fused_gate_up(self, dtype: torch.dtype) -> torch.Tensor | None:
        """w1 and w3 as one ``[E, model_dim, 2 * hidden_dim]`` weight, without a copy, when they are
        side-by-side views of one tensor (as :func:`flexmoe.integrations.transformers.to_flexmoe`
        lays them out, like transformers' fused ``gate_up_proj``) in ``dtype`` and no gradient is
        wanted for them (inference); else None. One GEMM then computes both."""
        w1, w3 = self.w1, self.w3
        if w3 is None or w1.dtype != dtype or w3.dtype != dtype or w1.stride() != w3.stride():
            return None
        if torch.is_grad_enabled() and (w1.requires_grad or w3.requires_grad):
            return None  # autograd needs w1 and w3 themselves in the graph
        if w1.untyped_storage().data_ptr() != w3.untyped_storage().data_ptr():
            return None
        if w3.storage_offset() != w1.storage_offset() + self.hidden_dim * w1.stride(2):
            return None
        shape = (*w1.shape[:2], 2 * self.hidden_dim)
        return w1.as_strided(shape, w1.stride(), w1.storage_offset())

    def forward_grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Grouped layout. x: [rows, model_dim] sorted by expert, ``tokens_per_expert[e]``
        rows for expert e (sums to rows) -> [rows, model_dim]. Exact counts, no padding."""
        weights = self._weights_in(x.dtype)
        if torch.compiler.is_compiling():  # a registered op: grouped_mm's fake rule wants bfloat16
            return exact_count_ffn("grouped", x, tokens_per_expert, self.activation, *weights)
        return grouped_ffn(x, tokens_per_expert, self.activation, *weights, gate_up=self.fused_gate_up(x.dtype))

    def _weights_in(self, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """[w1, b1, w3, w2, b2] in ``dtype`` (None for absent ones)."""
        return [None if w is None else w.to(dtype) for w in (self.w1, self.b1, self.w3, self.w2, self.b2)]

    def forward_per_expert(
        self,
        x: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        *,
        token_index: torch.Tensor | None = None,
        gates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Grouped layout, one GEMM pair per expert (any dtype, float64 included).
        x: [rows, model_dim] sorted by expert, ``tokens_per_expert[e]`` rows for expert e ->
        [rows, model_dim]. With ``token_index`` and ``gates`` (a routing plan's, [kept] sorted by
        expert) it dispatches and combines as well, one expert at a time: x [tokens, model_dim]
        -> [tokens, model_dim], the gate-weighted sum of each token's kept choices.
        Reads the counts on the host (one sync on CUDA: meant for CPU, where plain per-expert
        GEMMs beat ``grouped_mm`` once experts get many rows). Hand-written backward
        (:mod:`flexmoe.ops.per_expert`): differentiable once."""
        weights = self._weights_in(x.dtype)
        if torch.compiler.is_compiling():  # a registered op: dynamo cannot follow the loop over counts
            routing = {"token_index": token_index, "gates": gates}
            return exact_count_ffn("per_expert", x, tokens_per_expert, self.activation, *weights, **routing)
        counts = tokens_per_expert.tolist()
        return per_expert_ffn(
            x, counts, self.activation, *weights, self.buffer_cache, token_index=token_index, gates=gates
        )

    def forward_exact_with(
        self, x: torch.Tensor, tokens_per_expert: list[int], weights: dict[str, torch.Tensor], kernel: str
    ) -> torch.Tensor:
        """Grouped layout with given weights (e.g. gathered from other ranks, named as
        :meth:`expert_parameters`, ``n`` experts): x [rows, model_dim] sorted by expert,
        ``tokens_per_expert[e]`` rows (host ints, ``n`` of them) -> [rows, model_dim].
        ``kernel``: ``"grouped"`` (``grouped_mm``) or ``"per_expert"`` (any dtype)."""
        weights = {name: w.to(x.dtype) for name, w in weights.items()}
        w1, w3, b1, w2, b2 = (weights.get(name) for name in ("w1", "w3", "b1", "w2", "b2"))
        if torch.compiler.is_compiling():  # the registered op, as forward_grouped / forward_per_expert
            counts = torch.tensor(tokens_per_expert, device=x.device)
            return exact_count_ffn(kernel, x, counts, self.activation, w1, b1, w3, w2, b2)
        if kernel == "per_expert":
            # No buffer cache: several calls of one step (pipelined parts) keep their activations.
            return per_expert_ffn(x, tokens_per_expert, self.activation, w1, b1, w3, w2, b2)
        # Host ints to the device without synchronising its stream (they are known on the host).
        counts = torch.tensor(tokens_per_expert).to(x.device, non_blocking=True)
        return grouped_ffn(x, counts, self.activation, w1, b1, w3, w2, b2)

    def _hidden(self, pre: torch.Tensor, gate_in: torch.Tensor | None, b1: torch.Tensor | None) -> torch.Tensor:
        if b1 is not None:
            pre = pre + b1
        hidden = self.activation(pre)
        return hidden if gate_in is None else hidden * gate_in


def _standalone_weights(module: FFNExperts, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: weights that are views (w1 and w3 as the two halves of one fused tensor,
    see :meth:`FFNExperts.fused_gate_up`, or transposed views of a converted model's tensors) are
    given as contiguous copies of their own, so that savers that refuse shared or strided storage
    (safetensors, ``save_pretrained``, Trainer checkpoints) take them. Loading copies back into the
    views. Plain parameters are left as they are; so are DTensor parameters (their state-dict entry
    is the global tensor, and their local shard is a tensor of its own)."""
    plain = {
        name: param
        for name, param in module.expert_parameters().items()
        if not param.is_meta and not hasattr(param, "to_local")
    }
    storages: dict[int, int] = {}
    for param in plain.values():
        pointer = param.untyped_storage().data_ptr()
        storages[pointer] = storages.get(pointer, 0) + 1
    for name, param in plain.items():
        key = prefix + name
        if key not in state_dict:
            continue
        if not param.is_contiguous() or storages[param.untyped_storage().data_ptr()] > 1:
            state_dict[key] = state_dict[key].detach().clone(memory_format=torch.contiguous_format)
