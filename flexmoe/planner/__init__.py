"""Cost model of the MoE layer at scale: predicted forward + backward time of every (r, d,
all-to-all algorithm, exact|padded) choice on a described cluster, the best, sweeps over world
sizes, calibration against measured runs, and the tuner's candidate pruning. docs/planner.md."""

from flexmoe.planner.calibrate import Measurement, fit_cluster, load_measurements, validate
from flexmoe.planner.config import PRESETS, ClusterConfig, LayerShape, preset, skewed_load
from flexmoe.planner.model import PlanChoice, Prediction, Workload, predict
from flexmoe.planner.plan import Plan, make_plan, plot_sweep, sweep, valid_plan_choices
from flexmoe.planner.pruning import candidates_to_measure, tuner_predictor

__all__ = [
    "PRESETS",
    "ClusterConfig",
    "LayerShape",
    "Measurement",
    "Plan",
    "PlanChoice",
    "Prediction",
    "Workload",
    "candidates_to_measure",
    "fit_cluster",
    "load_measurements",
    "make_plan",
    "plot_sweep",
    "predict",
    "preset",
    "skewed_load",
    "sweep",
    "tuner_predictor",
    "valid_plan_choices",
    "validate",
]
