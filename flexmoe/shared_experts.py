"""Shared experts: dense FFNs every token passes through, added to the routed experts' output.

DeepSeek-MoE / DeepSeek-V3 and Qwen2-MoE keep a few always-on experts beside the routed ones
so common knowledge need not be replicated in every routed expert. ``num_shared`` experts of
width ``hidden_dim`` are stored merged as one FFN of width ``num_shared * hidden_dim``: the
sum of several FFNs applied to the same input is the FFN of their concatenated hidden units.
They are ordinary (replicated) parameters: under expert parallelism they stay on every rank
and are never sent through the all-to-all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flexmoe.experts import FFNExperts


class SharedExperts(nn.Module):
    """x: [tokens, model_dim] -> [tokens, model_dim] = ``gate(x) * FFN(x)``.

    Parameters: ``ffn`` an :class:`FFNExperts` with one expert of width ``num_shared * hidden_dim``
    (``ffn.w1 [1, model_dim, num_shared * hidden_dim]``, ...); with ``gated_output`` also
    ``gate.weight [1, model_dim]`` and the output is scaled per token by ``sigmoid(x @ gate.weight.T)``.
    """

    def __init__(
        self,
        num_shared: int,
        model_dim: int,
        hidden_dim: int,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "gelu",
        bias: bool = True,
        gated: bool = False,
        gated_output: bool = False,
    ) -> None:
        super().__init__()
        self.num_shared = num_shared
        self.ffn = FFNExperts(1, model_dim, num_shared * hidden_dim, activation, bias, gated)
        self.gate = nn.Linear(model_dim, 1, bias=False) if gated_output else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, model_dim] -> [tokens, model_dim]."""
        out = self.ffn(x.unsqueeze(0)).squeeze(0)
        if self.gate is not None:
            out = torch.sigmoid(nn.functional.linear(x, self.gate.weight.to(x.dtype))) * out
        return out
