"""flexmoe: adaptive Mixture-of-Experts for PyTorch."""

from flexmoe.config import MoEConfig
from flexmoe.experts import FFNExperts
from flexmoe.layer import MoELayer
from flexmoe.routing import RoutingPlan, plan_routes
from flexmoe.stats import RoutingStats
from flexmoe.task import DenseFFN, ExtractionReport, extract_task

__version__ = "0.1.0"

__all__ = ["FFNExperts", "MoEConfig", "MoELayer", "RoutingPlan", "RoutingStats", "__version__", "plan_routes"]
