"""Score functions and expert selection: logits -> scores -> each token's top-k experts.

* ``softmax`` scores sum to 1 over the experts (Switch, GShard, Mixtral, Qwen-MoE, OLMoE);
  ``sigmoid`` scores are independent per expert (DeepSeek-V3), so one expert's score does not
  shrink when another's grows.
* The *choice* may differ from the *gate*: a selection bias (loss-free balancing) and
  group-limited routing change which experts a token picks, while the gate weights applied at
  combine are always the unbiased scores of the picked experts.
* Group-limited routing (DeepSeek-V3's node-limited routing): the experts are split into
  ``num_groups`` equal, contiguous groups; each token keeps its ``top_groups`` best groups,
  ranked by the sum of the group's two highest choice scores, and picks its top-k inside them.
  Under expert parallelism with one group per node (experts placed contiguously, as
  ``flexmoe.parallel.layout`` does), a token is then sent to at most ``top_groups`` nodes,
  which bounds its cross-node all-to-all traffic.
"""

from __future__ import annotations

import torch

from flexmoe.config import SCORE_FUNCTIONS, ScoreFunction


def routing_scores(logits: torch.Tensor, score_function: ScoreFunction) -> torch.Tensor:
    """logits: [tokens, experts] -> scores [tokens, experts] (softmax over experts, or elementwise sigmoid)."""
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_function == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {score_function!r}")


def group_limited_scores(choice_scores: torch.Tensor, num_groups: int, top_groups: int) -> torch.Tensor:
    """choice_scores: [tokens, experts] -> the same with the experts outside each token's
    ``top_groups`` best groups set to ``-inf``. A group's rank is the sum of its top-2 scores
    (its only score when a group holds one expert)."""
    num_tokens, num_experts = choice_scores.shape
    if num_groups == 1 or top_groups >= num_groups:
        return choice_scores
    per_group = choice_scores.view(num_tokens, num_groups, num_experts // num_groups)
    group_rank = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(dim=-1)  # [T, G]
    kept_groups = group_rank.topk(top_groups, dim=-1).indices
    group_mask = torch.zeros_like(group_rank, dtype=torch.bool).scatter_(1, kept_groups, True)
    return per_group.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)


def select_experts(
    scores: torch.Tensor,
    top_k: int,
    *,
    selection_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    top_groups: int | None = None,
) -> torch.Tensor:
    """scores: [tokens, experts] -> chosen experts [tokens, top_k], best choice first.

    selection_bias: [experts] added to the scores for the choice only (loss-free balancing).
    num_groups, top_groups: group-limited routing (``top_groups=None``: all groups).
    """
    choice_scores = scores.detach()
    if selection_bias is not None:
        choice_scores = choice_scores + selection_bias.to(choice_scores.dtype)
    choice_scores = group_limited_scores(choice_scores, num_groups, num_groups if top_groups is None else top_groups)
    return choice_scores.topk(top_k, dim=1).indices
