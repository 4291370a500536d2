"""The expert step over a process group at parallel degree r and pipelining degree d.

Input and output: the padded buffer ``[num_experts, capacity, model_dim]`` of this rank's
tokens (capacity agreed by every rank). With S shards per expert (``layout.shards_per_expert``):

* r = 0 (data parallel): every rank all-gathers all expert weights and computes its own buffer;
  no token all-to-all.
* r >= 1 (a divisor of S): the S shards of an expert form r blocks of S / r ranks; each rank
  all-gathers its block's slices (a hidden slice ``hidden_dim / r`` wide; no gather when r = S).
  The ranks at the same position of their block exchange tokens: each sends every expert's
  buffer to that expert's r blocks and receives Tutel's flexible layout
  ``[local_experts, group * capacity, model_dim]``; the r partial outputs of a token are summed
  on the way back, with ``b2`` scaled by 1 / r so it is counted once.

Gradient convention: expert gradients are those of the MEAN over ranks of each rank's loss,
the same convention DistributedDataParallel applies to the replicated (router) parameters,
so DDP (or :func:`~flexmoe.parallel.allreduce_non_expert_grads`) plus these gradients equal the
single-process gradient of the mean loss. ``b2``, replicated on the S shards of an expert, gets
the same full gradient on each of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Function

from flexmoe.experts import FFNExperts
from flexmoe.parallel.all_to_all import Exchange, finish_all_to_all, start_all_to_all
from flexmoe.parallel.config import ParallelChoice
from flexmoe.parallel.groups import ParallelGroups
from flexmoe.parallel.layout import HIDDEN_AXIS, ExpertLayout, unshard


class _ExpertGrad(Function):
    """Identity forward; backward scales the gradient and, for a parameter replicated over
    ``group`` (b2 on the shards of an expert), sums it over the group."""

    @staticmethod
    def forward(ctx, x, scale, group):
        ctx.scale, ctx.group = scale, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = (grad * ctx.scale).contiguous()
        if ctx.group is not None:
            dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


def gather_shards(shard: torch.Tensor, hidden_axis: int | None, num_experts: int, group) -> torch.Tensor:
    """Every rank's shard of ``group`` -> the tensor of ``num_experts`` experts they make up
    (:func:`unshard` order). Collective: every rank of the group calls it. No gradient."""
    pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, shard.contiguous(), group=group)
    return unshard(pieces, hidden_axis, num_experts)


class _GatherShards(Function):
    """Forward: every rank's shard -> the tensor of ``num_experts`` experts they make up
    (:func:`unshard` order). Backward: the gradients of all ranks summed, this rank's shard."""

    @staticmethod
    def forward(ctx, shard, hidden_axis, num_experts, group):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.layout, ctx.hidden_axis, ctx.group = ExpertLayout(num_experts, size, rank), hidden_axis, group
        return gather_shards(shard, hidden_axis, num_experts, group)

    @staticmethod
    def backward(ctx, grad):
        # all_reduce + slice rather than reduce_scatter: gloo has no reduce_scatter.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return ctx.layout.shard(grad, ctx.hidden_axis), None, None, None


def gather_expert_weights(
    experts: FFNExperts, layout: ExpertLayout, groups: ParallelGroups, parallel_degree: int
) -> dict[str, torch.Tensor]:
    """The weights this rank computes with at degree r, by parameter name (``HIDDEN_AXIS`` keys).

    r = 0: all experts, full hidden width. r >= 1: the local experts, hidden width
    ``hidden_dim / r``; ``b2`` is divided by r (the r partial outputs are summed).
    """
    scale = 1.0 / layout.world_size
    shards = layout.shards_per_expert
    weights = {}
    for name, param in experts.expert_parameters().items():
        axis = HIDDEN_AXIS[name]
        replicated = parallel_degree > 0 and axis is None and shards > 1
        param = _ExpertGrad.apply(param, scale, groups.shard_group(layout) if replicated else None)
        if parallel_degree == 0:
            param = _GatherShards.apply(param, axis, layout.num_experts, groups.group)
        elif replicated:
            param = param / parallel_degree
        elif axis is not None and parallel_degree < shards:
            param = _GatherShards.apply(param, axis, 1, groups.gather_block(layout, parallel_degree))
        weights[name] = param
    return weights


def _exchange_for(groups: ParallelGroups, layout: ExpertLayout, choice: ParallelChoice) -> Exchange:
    if choice.a2a_algorithm == "2dh":
        return Exchange("2dh", node_group=groups.node_group(), cross_node_group=groups.cross_node_group())
    return Exchange("linear", group=groups.a2a_group(layout, choice.parallel_degree))


def run_expert_parallel(
    buffer: torch.Tensor,
    experts: nn.Module,
    layout: ExpertLayout,
    groups: ParallelGroups,
    choice: ParallelChoice,
) -> torch.Tensor:
    """buffer: [num_experts, capacity, model_dim] -> expert outputs of the same shape.

    ``experts``: built-in :class:`FFNExperts` (any valid degree), or a custom module mapping
    ``[local_experts, rows, model_dim]`` to the same shape (whole experts, r = 1 only).
    """
    if isinstance(experts, FFNExperts):
        weights = gather_expert_weights(experts, layout, groups, choice.parallel_degree)
        if choice.parallel_degree == 0:
            return experts.forward_with(buffer, weights)

        def compute(x: torch.Tensor) -> torch.Tensor:
            return experts.forward_with(x, weights)
    else:
        # Custom experts: their parameters are not ours to wrap; scaling the input's gradient by
        # W and the output's by 1/W gives the parameters the 1/W of the convention, inputs 1.
        def compute(x: torch.Tensor) -> torch.Tensor:
            out = experts(_ExpertGrad.apply(x, float(layout.world_size), None))
            return _ExpertGrad.apply(out, 1.0 / layout.world_size, None)

    # At most one chunk per slot (one empty chunk when no rank has tokens, so the expert
    # parameters still get their zero gradients, as in a single process).
    chunks = buffer.tensor_split(max(1, min(choice.overlap_degree, buffer.shape[1])), dim=1)
    outputs = _pipeline(chunks, compute, layout, groups, choice)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # one chunk: no copy


def _pipeline(
    chunks: tuple[torch.Tensor, ...],
    compute: Callable[[torch.Tensor], torch.Tensor],
    layout: ExpertLayout,
    groups: ParallelGroups,
    choice: ParallelChoice,
) -> list[torch.Tensor]:
    """Each chunk [E, c, M] there, through ``compute`` (flexible layout), and back: [E, c, M] each.

    The next chunk's exchange is issued before this chunk computes, and this chunk's return
    exchange before the next computes, so transfers overlap compute (backward mirrors it).
    """
    degree = choice.parallel_degree
    there = [_exchange_for(groups, layout, choice) for _ in chunks]
    back = [_exchange_for(groups, layout, choice) for _ in chunks]
    sent = [start_all_to_all(_to_destinations(chunks[0], layout, degree), there[0])]
    returned = []
    for i in range(len(chunks)):
        if i + 1 < len(chunks):
            sent.append(start_all_to_all(_to_destinations(chunks[i + 1], layout, degree), there[i + 1]))
        received = finish_all_to_all(sent[i], there[i])  # [group, local_experts, c, M]
        computed = compute(_flexible_layout(received))
        returned.append(start_all_to_all(_from_flexible_layout(computed, received.shape), back[i]))
    return [
        _sum_partials(finish_all_to_all(pending, exchange), degree, chunk.shape)
        for pending, exchange, chunk in zip(returned, back, chunks)
    ]


def _to_destinations(chunk: torch.Tensor, layout: ExpertLayout, parallel_degree: int) -> torch.Tensor:
    """[E, c, M] -> [group, local_experts, c, M]: each expert's rows once per block computing it."""
    if parallel_degree > 1:
        chunk = chunk.repeat_interleave(parallel_degree, dim=0)
    return chunk.reshape(chunk.shape[0] // layout.local_experts, layout.local_experts, *chunk.shape[1:])


def _flexible_layout(received: torch.Tensor) -> torch.Tensor:
    """[group, local_experts, c, M] -> [local_experts, group * c, M] (Tutel's flexible layout)."""
    group, local, c, model_dim = received.shape
    return received.transpose(0, 1).reshape(local, group * c, model_dim)


def _from_flexible_layout(computed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    group, local, c, model_dim = shape
    return computed.reshape(local, group, c, model_dim).transpose(0, 1)


def _sum_partials(returned: torch.Tensor, parallel_degree: int, chunk_shape: torch.Size) -> torch.Tensor:
    """[group, local_experts, c, M] -> [E, c, M], summing the r partial outputs of each expert."""
    if parallel_degree <= 1:  # one output per expert: nothing to sum (and no copy)
        return returned.reshape(chunk_shape)
    num_experts, c, model_dim = chunk_shape
    return returned.reshape(num_experts, parallel_degree, c, model_dim).sum(dim=1)
