"""flexmoe: adaptive Mixture-of-Experts for PyTorch."""

from flexmoe.config import MoEConfig
from flexmoe.experts import FFNExperts
from flexmoe.layer import MoELayer
from flexmoe.parallel import ParallelConfig
from flexmoe.routing import RoutingPlan, plan_routes
from flexmoe.stats import RoutingStats
from flexmoe.task import (
    DenseFFN,
    ExpertUsage,
    ExtractionReport,
    expert_usage,
    extract_task,
    load_subnetwork,
    prune_experts,
    save_subnetwork,
)

__version__ = "0.1.0"

__all__ = [
    "DenseFFN",
    "ExpertUsage",
    "ExtractionReport",
    "FFNExperts",
    "MoEConfig",
    "MoELayer",
    "ParallelConfig",
    "RoutingPlan",
    "RoutingStats",
    "__version__",
    "expert_usage",
    "extract_task",
    "load_subnetwork",
    "plan_routes",
    "prune_experts",
    "save_subnetwork",
]
