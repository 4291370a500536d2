"""Distributed MoE: the expert layout, process groups, all-to-all, parallel degree, pipelining."""

from flexmoe.parallel.config import A2A_ALGORITHMS, ParallelChoice, ParallelConfig
from flexmoe.parallel.data_parallel import (
    allreduce_non_expert_grads,
    clip_grad_norm_,
    expert_parameters,
    non_expert_parameters,
)
from flexmoe.parallel.groups import SINGLE_PROCESS, ParallelGroups
from flexmoe.parallel.layout import HIDDEN_AXIS, ExpertLayout, unshard

__all__ = [
    "A2A_ALGORITHMS",
    "HIDDEN_AXIS",
    "SINGLE_PROCESS",
    "ExpertLayout",
    "ParallelChoice",
    "ParallelConfig",
    "ParallelGroups",
    "allreduce_non_expert_grads",
    "clip_grad_norm_",
    "expert_parameters",
    "non_expert_parameters",
    "unshard",
]
