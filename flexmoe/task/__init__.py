"""Task-level MoE deployment: sub-network extraction, expert pruning, usage statistics."""

from flexmoe.task.dense import DenseFFN
from flexmoe.task.extract import ExtractionReport, extract_task, reducible_layers
from flexmoe.task.io import load_subnetwork, save_subnetwork
from flexmoe.task.prune import prune_experts, prune_layer
from flexmoe.task.usage import ExpertUsage, expert_usage

__all__ = [
    "DenseFFN",
    "ExpertUsage",
    "ExtractionReport",
    "expert_usage",
    "extract_task",
    "load_subnetwork",
    "prune_experts",
    "prune_layer",
    "reducible_layers",
    "save_subnetwork",
]
