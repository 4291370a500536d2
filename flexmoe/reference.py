"""The plain, slow, obviously-correct MoE forward that tests compare against.

GShard/fairseq style: one-hot masks, cumulative sums for slot positions, a dense
``[tokens, experts, capacity]`` combine tensor and einsums. Runs in any dtype, float64
included. It reads the parameters of an :class:`~flexmoe.MoELayer` but shares none of
its code paths (only the config's option names).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flexmoe.config import MoEConfig

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def reference_logits(params: dict[str, torch.Tensor], config: MoEConfig, tokens: torch.Tensor) -> torch.Tensor:
    """tokens: [T, M] -> router logits [T, E]."""
    if config.router == "linear":
        return tokens @ params["router.weight"].T
    projected = tokens @ params["router.proj.weight"].T + params["router.proj.bias"]
    projected = projected / projected.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = params["router.sim_matrix"]
    sim = sim / sim.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scale = torch.exp(torch.clamp(params["router.temperature"], max=math.log(100.0)))
    return projected @ sim.T * scale


def reference_experts(params: dict[str, torch.Tensor], config: MoEConfig, dispatched: torch.Tensor) -> torch.Tensor:
    """dispatched: [E, C, M] -> [E, C, M], one einsum per weight."""
    act = config.activation if callable(config.activation) else _ACTIVATIONS[config.activation]
    pre = torch.einsum("ecm,emh->ech", dispatched, params["experts.w1"])
    if config.bias:
        pre = pre + params["experts.b1"][:, None, :]
    hidden = act(pre)
    if config.gated:
        hidden = hidden * torch.einsum("ecm,emh->ech", dispatched, params["experts.w3"])
    out = torch.einsum("ech,ehm->ecm", hidden, params["experts.w2"])
    if config.bias:
        out = out + params["experts.b2"][:, None, :]
    return out


def reference_shared_experts(params: dict[str, torch.Tensor], config: MoEConfig, tokens: torch.Tensor) -> torch.Tensor:
    """tokens: [T, M] -> [T, M]: each of the ``num_shared_experts`` FFNs (its slice of the merged
    weights) applied separately and summed, times the sigmoid gate when configured."""
    act = config.activation if callable(config.activation) else _ACTIVATIONS[config.activation]
    width = config.shared_hidden_dim or config.hidden_dim
    total = torch.zeros_like(tokens)
    for expert in range(config.num_shared_experts):
        cols = slice(expert * width, (expert + 1) * width)
        pre = tokens @ params["shared_experts.ffn.w1"][0][:, cols]
        if config.bias:
            pre = pre + params["shared_experts.ffn.b1"][0][cols]
        hidden = act(pre)
        if config.gated:
            hidden = hidden * (tokens @ params["shared_experts.ffn.w3"][0][:, cols])
        total = total + hidden @ params["shared_experts.ffn.w2"][0][cols]
    if config.bias:
        total = total + params["shared_experts.ffn.b2"][0]
    if config.shared_expert_gate:
        total = total / (1 + torch.exp(-(tokens @ params["shared_experts.gate.weight"][0])))[:, None]
    return total


def reference_choices(
    params: dict[str, torch.Tensor], config: MoEConfig, scores: torch.Tensor, top_k: int
) -> torch.Tensor:
    """scores: [T, E] -> chosen experts [T, k]: top-k of scores + load-balance bias, restricted
    to each token's ``top_groups`` best groups (group rank: sum of its two best biased scores)."""
    choice_scores = scores.detach().clone()
    if config.loss_free_balance:
        choice_scores = choice_scores + params["load_balancer.bias"]
    if config.top_groups is not None and config.top_groups < config.num_groups:
        size = config.num_experts // config.num_groups
        for t in range(scores.shape[0]):
            ranks = []
            for g in range(config.num_groups):
                members = sorted(choice_scores[t, g * size : (g + 1) * size].tolist(), reverse=True)
                ranks.append(sum(members[:2]))
            kept = sorted(range(config.num_groups), key=lambda g: -ranks[g])[: config.top_groups]
            for g in range(config.num_groups):
                if g not in kept:
                    choice_scores[t, g * size : (g + 1) * size] = -math.inf
    return choice_scores.topk(top_k, dim=1).indices


def reference_capacity(config_factor: float, loads: torch.Tensor, num_tokens: int, top_k: int) -> int:
    num_experts = loads.numel()
    bound = top_k * math.ceil(abs(config_factor) * num_tokens / num_experts)
    if config_factor > 0:
        return bound
    largest = int(loads.max()) if num_tokens else 0
    return largest if config_factor == 0 else min(largest, bound)


def reference_aux_loss(config: MoEConfig, logits: torch.Tensor, scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Balance loss and z-loss from their textbook definitions (no gate noise)."""
    num_tokens, num_experts = scores.shape
    total = torch.zeros((), dtype=scores.dtype)
    if num_tokens == 0:
        return total
    if config.aux_loss == "gshard":
        top1 = F.one_hot(scores.argmax(dim=1), num_experts).to(scores.dtype)
        total = total + config.aux_loss_weight * num_experts * (scores.mean(0) * top1.mean(0)).sum()
    elif config.aux_loss == "load_importance":
        importance = scores.sum(0)
        chosen = F.one_hot(scores.topk(top_k, dim=1).indices, num_experts).sum(1).to(scores.dtype)
        load = chosen.sum(0)

        def cv2(v: torch.Tensor) -> torch.Tensor:
            return ((v - v.mean()) ** 2).mean() / (v.mean() ** 2 + 1e-10)

        total = total + config.aux_loss_weight * (cv2(importance) + cv2(load)) / 2
    if config.z_loss > 0:
        total = total + config.z_loss * (torch.log(torch.exp(logits).sum(-1)) ** 2).mean()
    return total


def reference_router_inputs(
    params: dict[str, torch.Tensor],
    config: MoEConfig,
    x: torch.Tensor,
    padding_mask: torch.Tensor | None,
    task_ids: torch.Tensor | None,
    sentence_inputs: torch.Tensor | None = None,
) -> torch.Tensor:
    """What the router sees for each token, [all tokens, dim]: the token itself, its sentence's
    mean over non-padding positions (or its row of ``sentence_inputs``), or its task's embedding row."""
    if config.granularity == "token":
        return x.reshape(-1, config.model_dim)
    if config.granularity == "sentence":
        rows = []
        for b in range(x.shape[0]):
            real = x[b] if padding_mask is None else x[b][~padding_mask[b]]
            mean = real.mean(0) if len(real) else torch.zeros(config.model_dim, dtype=x.dtype)
            if sentence_inputs is not None:
                mean = sentence_inputs[b]
            rows.append(mean.expand(x.shape[1], -1))
        return torch.cat(rows) if rows else x.reshape(0, config.model_dim)
    ids = task_ids if task_ids.shape == x.shape[:-1] else task_ids.reshape(-1, 1).expand(x.shape[:-1])
    return params["task_embedding.weight"][ids.reshape(-1)]


def reference_moe(
    params: dict[str, torch.Tensor],
    config: MoEConfig,
    x: torch.Tensor,
    *,
    top_k: int | None = None,
    capacity_factor: float | None = None,
    padding_mask: torch.Tensor | None = None,
    task_ids: torch.Tensor | None = None,
    sentence_inputs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x: [..., M] -> (output [..., M], aux_loss, capacity). ``params`` as in ``layer.named_parameters()``
    (plus ``load_balancer.bias`` from the buffers with ``loss_free_balance``).

    Padding positions (``padding_mask`` True) are not routed and get output 0.
    """
    top_k = config.top_k if top_k is None else top_k
    fixed_capacity = capacity_factor is None  # a per-call factor overrides expert_capacity
    capacity_factor = config.capacity_factor if capacity_factor is None else capacity_factor
    all_tokens = x.reshape(-1, config.model_dim)
    router_inputs = reference_router_inputs(params, config, x, padding_mask, task_ids, sentence_inputs)
    routed = torch.ones(all_tokens.shape[0], dtype=torch.bool) if padding_mask is None else ~padding_mask.reshape(-1)
    tokens, router_inputs = all_tokens[routed], router_inputs[routed]
    num_tokens, num_experts = tokens.shape[0], config.num_experts

    logits = reference_logits(params, config, router_inputs)
    if config.score_function == "sigmoid":
        scores = 1 / (1 + torch.exp(-logits))
    else:
        scores = torch.softmax(logits, dim=-1)
    choices = reference_choices(params, config, scores, top_k)
    gate_values = torch.stack([scores[t, choices[t]] for t in range(num_tokens)]) if num_tokens else scores[:, :top_k]
    if config.normalize_gate:
        gate_values = gate_values / gate_values.sum(1, keepdim=True).clamp_min(torch.finfo(gate_values.dtype).eps)
    gate_values = gate_values * config.route_scale

    if config.batch_prioritized_routing:
        first_choice_score = scores.gather(1, choices[:, :1]).squeeze(1)
        order = torch.sort(first_choice_score.detach(), descending=True, stable=True).indices
    else:
        order = torch.arange(num_tokens)
    masks = [F.one_hot(choices[:, k], num_experts).to(torch.long) for k in range(top_k)]  # [T, E] each

    # Slot of each (token, choice): claims of earlier choice ranks first, then tokens in order.
    locations, claimed = [], torch.zeros(num_experts, dtype=torch.long)
    for mask in masks:
        in_order = mask[order]
        loc_in_order = torch.cumsum(in_order, dim=0) - 1 + claimed
        loc = torch.empty_like(loc_in_order)
        loc[order] = loc_in_order
        locations.append((loc * mask).sum(1))  # [T]
        claimed = claimed + mask.sum(0)
    capacity = reference_capacity(capacity_factor, claimed, num_tokens, top_k)
    if config.expert_capacity is not None and fixed_capacity:
        capacity = config.expert_capacity

    combine_weights = torch.zeros(num_tokens, num_experts, capacity, dtype=tokens.dtype)
    dispatch_mask = torch.zeros(num_tokens, num_experts, capacity, dtype=tokens.dtype)
    for k, mask in enumerate(masks):
        kept = locations[k] < capacity
        slot_onehot = F.one_hot(locations[k].clamp(max=max(capacity - 1, 0)), max(capacity, 1))[:, :capacity]
        placed = mask.to(tokens.dtype)[:, :, None] * slot_onehot.to(tokens.dtype)[:, None, :] * kept[:, None, None]
        dispatch_mask = dispatch_mask + placed
        combine_weights = combine_weights + gate_values[:, k, None, None] * placed

    dispatched = torch.einsum("tec,tm->ecm", dispatch_mask, tokens)
    expert_out = reference_experts(params, config, dispatched)
    out = torch.zeros_like(all_tokens)
    routed_out = torch.einsum("tec,ecm->tm", combine_weights, expert_out)
    if config.num_shared_experts:
        routed_out = routed_out + reference_shared_experts(params, config, tokens)
    out[routed] = routed_out
    aux = reference_aux_loss(config, logits, scores, top_k)
    return out.reshape(x.shape), aux, capacity
