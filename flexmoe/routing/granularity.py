"""Routing granularity: what one routing decision covers (Kudugunta et al., 2021).

* ``token``: every token is routed on its own representation.
* ``sentence``: one decision per sequence, made from the mean of its non-padding tokens;
  every token of the sequence gets the sequence's top-k experts and gate weights.
* ``task``: one decision per task id, made from a learned task embedding; every token of
  a task goes to the same experts, which is what makes per-task sub-networks extractable.

The router sees one row per *routing unit* (token, sentence or task); ``unit_of_token``
maps each routed token to its unit so the unit's scores can be expanded to the tokens.
Everything after that (capacity, placement, dispatch, aux loss) is the same for all
granularities and is defined over routed tokens: the balance loss balances the real
expert load, each token counted with the distribution of its unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexmoe.config import GRANULARITIES, Granularity


@dataclass
class RoutingUnits:
    """inputs: [units, dim] router input per unit (None: the tokens themselves);
    unit_of_token: [routed tokens] unit index of each token (None: one unit per token)."""

    inputs: torch.Tensor | None
    unit_of_token: torch.Tensor | None


def check_padding_mask(padding_mask: torch.Tensor | None, x: torch.Tensor) -> None:
    """``padding_mask``: bool ``x.shape[:-1]``, True where the position is padding."""
    if padding_mask is None:
        return
    if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool:
        raise TypeError("padding_mask must be a bool tensor (True = padding position)")
    if padding_mask.shape != x.shape[:-1]:
        raise ValueError(
            f"padding_mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(padding_mask.shape)}"
        )


def token_task_ids(task_ids: torch.Tensor | None, x: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Validate ``task_ids`` ([batch] per sequence or x.shape[:-1] per token) -> [all tokens] ids."""
    if task_ids is None:
        raise ValueError("task_ids is required for granularity='task' ([batch] or x.shape[:-1] integer tensor)")
    if not isinstance(task_ids, torch.Tensor) or task_ids.is_floating_point() or task_ids.dtype == torch.bool:
        raise TypeError(f"task_ids must be an integer tensor, got {getattr(task_ids, 'dtype', type(task_ids))}")
    token_shape = x.shape[:-1]
    if task_ids.shape == token_shape:
        per_token = task_ids
    elif task_ids.dim() == 1 and len(token_shape) >= 1 and task_ids.shape[0] == token_shape[0]:
        per_token = task_ids.reshape(-1, *([1] * (len(token_shape) - 1))).expand(token_shape)
    else:
        raise ValueError(
            f"task_ids must have shape [batch] = ({token_shape[0] if token_shape else '?'},) or "
            f"x.shape[:-1] = {tuple(token_shape)}, got {tuple(task_ids.shape)}"
        )
    if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks):
        raise ValueError(
            f"task_ids must be in 0..num_tasks-1 = 0..{num_tasks - 1}, got values in "
            f"{int(task_ids.min())}..{int(task_ids.max())}"
        )
    return per_token.reshape(-1).long()


def sentence_means(x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """x: [batch, seq, dim] -> [batch, dim] mean over non-padding positions (0 for all-padding rows)."""
    if padding_mask is None:
        return x.mean(dim=1)
    real = (~padding_mask).to(x.dtype).unsqueeze(-1)
    return (x * real).sum(dim=1) / real.sum(dim=1).clamp_min(1)


def routing_units(
    granularity: Granularity,
    x: torch.Tensor,
    routed_positions: torch.Tensor | None,
    padding_mask: torch.Tensor | None,
    task_ids: torch.Tensor | None,
    task_embedding: torch.nn.Embedding | None,
    sentence_inputs: torch.Tensor | None = None,
) -> RoutingUnits:
    """Router inputs per unit and the unit of each routed token.

    x: [..., dim] the layer input; routed_positions: [routed] flat positions of the tokens that
    are routed (None: all); task_embedding: the layer's task embedding (task granularity);
    sentence_inputs: [batch, dim] the router input of each sequence (sentence granularity)
    instead of the mean of its tokens, e.g. the source sentence for a decoder, whose own mean
    would include target tokens that step-by-step decoding has not produced yet.
    """
    if granularity == "token":
        return RoutingUnits(None, None)
    if granularity == "sentence":
        if x.dim() != 3:
            raise ValueError(f"granularity='sentence' needs x of shape [batch, seq, model_dim], got {tuple(x.shape)}")
        unit = torch.arange(x.shape[0], device=x.device).repeat_interleave(x.shape[1])
        if sentence_inputs is None:
            inputs = sentence_means(x, padding_mask)
        elif not isinstance(sentence_inputs, torch.Tensor) or sentence_inputs.shape != (x.shape[0], x.shape[2]):
            shape = tuple(sentence_inputs.shape) if isinstance(sentence_inputs, torch.Tensor) else sentence_inputs
            wanted = (x.shape[0], x.shape[2])
            raise ValueError(f"sentence_inputs must have shape [batch, model_dim] = {wanted}, got {shape}")
        else:
            inputs = sentence_inputs
    elif granularity == "task":
        assert task_embedding is not None
        unit = token_task_ids(task_ids, x, task_embedding.num_embeddings).to(x.device)
        inputs = task_embedding.weight
    else:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return RoutingUnits(inputs, unit if routed_positions is None else unit[routed_positions])
