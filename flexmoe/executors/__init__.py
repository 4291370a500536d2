"""Executors: run a :class:`~flexmoe.routing.RoutingPlan` through the experts, tokens -> outputs.

An :class:`~flexmoe.MoELayer` picks one when it is built, from its process group:

* :class:`LocalExecutor`: every expert in this process; dispatch -> experts -> combine with the
  kernel chosen per call (grouped / per_expert on exact counts, or the padded buffer).
* :class:`ExpertParallelExecutor`: experts spread over a process group; the count exchange,
  the all-to-all (exact counts or padded blocks), the parallel / pipelining degrees and the
  run-time tuner.

Both take ``run(tokens [T, model_dim], plan, choice, top_k) -> [T, model_dim]``.
"""

from flexmoe.executors.expert_parallel import ExpertParallelExecutor
from flexmoe.executors.kernels import grouped_unsupported_reason
from flexmoe.executors.local import LocalExecutor

__all__ = ["ExpertParallelExecutor", "LocalExecutor", "grouped_unsupported_reason"]
