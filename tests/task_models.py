"""Tiny multi-task models for the serving and CLI tests (importable as ``tests.task_models:...``)."""

from __future__ import annotations

import torch
from torch import nn

from flexmoe import MoELayer

MODEL_DIM, NUM_TASKS = 16, 5


class TinyTaskModel(nn.Module):
    """x [batch, seq, 16] -> a token-routed MoE layer, two task-routed (or token-routed) MoE
    layers, a linear head -> [batch, seq, 4]. Residual; all layers dropless."""

    def __init__(self, task_routed: bool = True) -> None:
        super().__init__()
        common = dict(model_dim=MODEL_DIM, num_experts=8, hidden_dim=8, top_k=2, capacity_factor=0.0)
        task = dict(granularity="task", num_tasks=NUM_TASKS) if task_routed else {}
        self.encoder = MoELayer(**common)
        self.decoder = nn.ModuleList([MoELayer(**common, **task) for _ in range(2)])
        self.head = nn.Linear(MODEL_DIM, 4)
        with torch.no_grad():  # non-zero biases: zeros would hide a bias that is lost
            for name, p in self.named_parameters():
                if ".b" in name:
                    p.normal_(std=0.1)

    def forward(
        self, x: torch.Tensor, task_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.encoder(x, padding_mask=padding_mask)
        for layer in self.decoder:
            x = x + layer(x, task_ids=task_ids, padding_mask=padding_mask)
        return self.head(x)


def tiny_task_model(task_routed: bool = True, dtype: str = "float64", seed: int = 0) -> TinyTaskModel:
    """The factory the CLI tests name with ``--model tests.task_models:tiny_task_model``."""
    torch.manual_seed(seed)
    return TinyTaskModel(task_routed).to(getattr(torch, dtype)).eval()
