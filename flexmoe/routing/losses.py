"""Auxiliary router losses: load balance (GShard, Shazeer load/importance) and ST-MoE z-loss."""

from __future__ import annotations

import torch

from flexmoe.routing.capacity import count_per_expert


def gshard_balance_loss(
    scores: torch.Tensor, top1_expert: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """GShard/Switch balance loss ``E * sum_e mean_t(scores[t, e]) * fraction_e``.

    scores: [tokens, experts] routing probabilities; top1_expert: [tokens] each token's first
    choice. ``fraction_e`` is the share of tokens whose first choice is e (no gradient).
    Equals 1 when routing is perfectly uniform. valid: [tokens] bool, the tokens the statistics
    take (the others count nowhere and get no gradient); None: all.
    """
    num_tokens, num_experts = scores.shape
    if valid is None:
        fraction = count_per_expert(top1_expert, num_experts, scores.dtype) / num_tokens
        return num_experts * torch.sum(scores.mean(dim=0) * fraction)
    weight = valid.to(scores.dtype)
    kept = weight.sum().clamp_min(1)
    fraction = torch.zeros(num_experts, dtype=scores.dtype, device=scores.device).scatter_add_(0, top1_expert, weight)
    return num_experts * torch.sum(_masked_rows(scores, valid).sum(dim=0) / kept * fraction / kept)


def _masked_rows(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """values: [tokens, ...] with the rows where ``valid`` is False set to 0 (and given no gradient)."""
    return torch.where(valid.reshape(-1, *[1] * (values.dim() - 1)), values, 0)


def squared_cv(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean^2`` (population variance)."""
    return values.var(correction=0) / (values.mean() ** 2 + 1e-10)


def load_importance_loss(
    scores: torch.Tensor,
    clean_logits: torch.Tensor,
    noisy_logits: torch.Tensor | None,
    chosen_experts: torch.Tensor,
    noise_std: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shazeer et al. (2017): ``(cv^2(importance) + cv^2(load)) / 2``.

    importance_e = sum_t scores[t, e] (scores without noise). With gate noise
    (``noisy_logits`` given, ``noise_std > 0``), load_e is the smooth estimate
    ``sum_t Phi((clean_logits[t, e] - kth_noisy_logit[t]) / noise_std)``; without noise it is
    the hard count of choices routed to e (no gradient).
    chosen_experts: [tokens, k] the experts each token chose. valid: [tokens] bool, the tokens
    the statistics take; None: all.
    """

    def total(values: torch.Tensor) -> torch.Tensor:
        return (values if valid is None else _masked_rows(values, valid)).sum(dim=0)

    importance = total(scores)
    if noisy_logits is not None and noise_std > 0:
        threshold = noisy_logits.gather(1, chosen_experts).min(dim=1, keepdim=True).values
        normal = torch.distributions.Normal(0.0, noise_std)
        load = total(normal.cdf(clean_logits - threshold))
    elif valid is None:
        load = count_per_expert(chosen_experts.reshape(-1), scores.shape[1], scores.dtype)
    else:
        load = total(torch.zeros_like(scores).scatter_(1, chosen_experts, 1.0))
    return (squared_cv(importance) + squared_cv(load)) / 2


def router_z_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss ``mean_t logsumexp(logits[t])^2``: keeps router logits small. valid:
    [tokens] bool, the tokens the mean takes; None: all."""
    squares = torch.logsumexp(logits, dim=-1).pow(2)
    if valid is None:
        return squares.mean()
    return _masked_rows(squares, valid).sum() / valid.sum().clamp_min(1)


def router_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the routing distribution over tokens; log(E) is uniform."""
    return -(scores * torch.log(scores.clamp_min(1e-20))).sum(dim=-1).mean()
