"""flexmoe: adaptive Mixture-of-Experts for PyTorch."""

from flexmoe.checkpoint import convert_checkpoint, load_checkpoint, save_checkpoint
from flexmoe.config import ExpertsConfig, MoEConfig, RoutingConfig, SharedExpertsConfig
from flexmoe.experts import FFNExperts
from flexmoe.layer import MoELayer
from flexmoe.parallel import ParallelConfig
from flexmoe.routing import LoadBalanceBias, RoutingPlan, plan_routes
from flexmoe.serving import CacheBound, Request, ServerStats, TaskServer
from flexmoe.shared_experts import SharedExperts
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
from flexmoe.tuner import Tuner

__version__ = "0.1.0"

__all__ = [
    "CacheBound",
    "DenseFFN",
    "ExpertUsage",
    "ExpertsConfig",
    "ExtractionReport",
    "FFNExperts",
    "LoadBalanceBias",
    "MoEConfig",
    "MoELayer",
    "ParallelConfig",
    "Request",
    "RoutingConfig",
    "RoutingPlan",
    "RoutingStats",
    "ServerStats",
    "SharedExperts",
    "SharedExpertsConfig",
    "TaskServer",
    "Tuner",
    "__version__",
    "convert_checkpoint",
    "expert_usage",
    "extract_task",
    "load_checkpoint",
    "load_subnetwork",
    "plan_routes",
    "prune_experts",
    "save_checkpoint",
    "save_subnetwork",
]
