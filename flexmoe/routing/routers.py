"""Routers: map tokens ``[tokens, model_dim]`` to float32 logits ``[tokens, num_experts]``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _float32_input(x: torch.Tensor) -> torch.Tensor:
    # Routing decisions are made in float32 (or float64) even when experts run in half precision.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class LinearRouter(nn.Module):
    """Linear gate: ``logits = x @ weight.T``; ``weight`` is ``[num_experts, model_dim]``."""

    def __init__(self, model_dim: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, model_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal with std ``model_dim ** -0.5`` (also after building on the meta device and ``to_empty``)."""
        nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, model_dim] -> logits [tokens, num_experts] in float32 (float64 for float64 input)."""
        x = _float32_input(x)
        return F.linear(x, self.weight.to(x.dtype))


class CosineRouter(nn.Module):
    """SwinV2-MoE cosine router.

    ``logits = normalize(proj(x)) @ normalize(sim_matrix).T * exp(min(temperature, log 100))``:
    a projection to ``proj_dim``, cosine similarity with one learned vector per expert and a
    learned (clamped) temperature, initialised at 0.5 as in the paper.
    """

    MAX_LOGIT_SCALE = math.log(1.0 / 0.01)

    def __init__(self, model_dim: int, num_experts: int, proj_dim: int = 256, init_temperature: float = 0.5) -> None:
        super().__init__()
        self.init_temperature = init_temperature
        self.proj = nn.Linear(model_dim, proj_dim)
        self.sim_matrix = nn.Parameter(torch.empty(num_experts, proj_dim))
        self.temperature = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``sim_matrix`` normal with std 0.01, ``temperature`` ``log(1 / init_temperature)``; ``proj``
        (an ``nn.Linear``) resets itself."""
        nn.init.normal_(self.sim_matrix, std=0.01)
        nn.init.constant_(self.temperature, math.log(1.0 / self.init_temperature))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, model_dim] -> logits [tokens, num_experts] in float32 (float64 for float64 input)."""
        x = _float32_input(x)
        projected = F.linear(x, self.proj.weight.to(x.dtype), self.proj.bias.to(x.dtype))
        cosine = F.normalize(projected, dim=-1) @ F.normalize(self.sim_matrix.to(x.dtype), dim=-1).T
        scale = torch.clamp(self.temperature.to(x.dtype), max=self.MAX_LOGIT_SCALE).exp()
        return cosine * scale


def build_router(kind: str, model_dim: int, num_experts: int, proj_dim: int = 256) -> nn.Module:
    """Router module for ``kind`` in ``("linear", "cosine")``."""
    if kind == "linear":
        return LinearRouter(model_dim, num_experts)
    if kind == "cosine":
        return CosineRouter(model_dim, num_experts, proj_dim)
    raise ValueError(f"router must be 'linear' or 'cosine', got {kind!r}")
