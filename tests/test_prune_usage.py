"""expert_usage per task and usage-based pruning of token-routed models."""

import pytest
import torch
from torch import nn

from flexmoe import MoELayer, expert_usage, prune_experts


class TaskBiasedModel(nn.Module):
    """Token-routed MoE whose input carries a strong per-task offset, so tasks use few experts."""

    def __init__(self):
        super().__init__()
        self.task_offset = nn.Embedding(3, 16)
        with torch.no_grad():
            self.task_offset.weight.mul_(6.0)
        self.moe = MoELayer(model_dim=16, num_experts=8, hidden_dim=8, top_k=2, router="linear")
        self.double().eval()

    def forward(self, x, task_ids, padding_mask=None):
        h = x + self.task_offset(task_ids)[:, None, :]
        return h + self.moe(h, task_ids=task_ids, padding_mask=padding_mask)


def _batches(task, n=3):
    g = torch.Generator().manual_seed(task)
    return [
        {"x": 0.1 * torch.randn(4, 6, 16, generator=g, dtype=torch.float64), "task_ids": torch.full((4,), task)}
        for _ in range(n)
    ]


def test_usage_counts_and_lossless_pruning_to_used_experts():
    model = TaskBiasedModel()
    usage = expert_usage(model, _batches(0) + _batches(1), by_task=True)
    counts = usage.counts["moe"]
    assert counts.shape == (2, 8)
    assert counts[0].sum() == 3 * 4 * 6 * 2 and counts[1].sum() == 3 * 4 * 6 * 2  # tokens x top-2
    used = int((counts[0] > 0).sum())
    keep = usage.top_experts(used, task=0)
    pruned = prune_experts(model, keep)
    assert pruned.moe.config.num_experts == used and pruned.moe.router.weight.shape == (used, 16)
    for batch in _batches(0):
        torch.testing.assert_close(pruned(**batch), model(**batch), rtol=1e-10, atol=1e-12)
    assert pruned.pruning_report == {"moe": keep["moe"]}
    assert model.moe.config.num_experts == 8  # the original is untouched


def test_usage_without_tasks_matches_stats_and_prune_errors():
    model = TaskBiasedModel()
    batches = _batches(2, n=1)
    usage = expert_usage(model, batches)
    model(**batches[0])
    assert torch.equal(usage.counts["moe"][0], model.moe.stats.kept_per_expert)
    with pytest.raises(ValueError, match="distinct experts"):
        prune_experts(model, [0, 0])
    with pytest.raises(ValueError, match="not MoE layers"):
        prune_experts(model, {"encoder": [0]})
    with pytest.raises(ValueError, match="no task_ids"):
        expert_usage(
            nn.Sequential(MoELayer(model_dim=4, num_experts=2, hidden_dim=4)),
            [{"input": torch.randn(3, 4)}],
            by_task=True,
        )
