"""Routing: routers -> scores -> RoutingPlan (expert, slot, gate per token choice) and losses."""

from flexmoe.routing.balance import LoadBalanceBias
from flexmoe.routing.capacity import capacity_bound, expert_capacity
from flexmoe.routing.losses import gshard_balance_loss, load_importance_loss, router_entropy, router_z_loss
from flexmoe.routing.plan import RoutingPlan, plan_routes, top_k_gates
from flexmoe.routing.routers import CosineRouter, LinearRouter, build_router
from flexmoe.routing.scores import group_limited_scores, routing_scores, select_experts

__all__ = [
    "CosineRouter",
    "LinearRouter",
    "LoadBalanceBias",
    "RoutingPlan",
    "build_router",
    "capacity_bound",
    "expert_capacity",
    "group_limited_scores",
    "gshard_balance_loss",
    "load_importance_loss",
    "plan_routes",
    "router_entropy",
    "router_z_loss",
    "routing_scores",
    "select_experts",
    "top_k_gates",
]
