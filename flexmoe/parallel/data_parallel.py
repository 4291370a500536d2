"""Expert parameters vs replicated parameters, for DistributedDataParallel and plain all-reduce.

The expert module of a distributed MoE layer is marked; the gradients of its parameters are
final after backward (the exchange's backward routes every rank's contribution to the owner;
see :mod:`flexmoe.parallel.expert_parallel` for the mean-over-ranks convention). Everything
else (router, embeddings, ...) is replicated and needs the usual data-parallel average:

    ddp_model = DistributedDataParallel(model)  # leaves the experts out (flexmoe.distributed.ddp)
    # or, without DDP, after loss.backward():
    allreduce_non_expert_grads(model)

The mark sits on the module, not on the parameter objects, so it survives ``.to()``,
``load_state_dict(assign=True)`` and anything else that replaces parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

_MARK = "_flexmoe_experts"


def mark_expert_module(module: nn.Module) -> None:
    """Mark ``module`` (and so all its parameters) as holding expert parameters."""
    setattr(module, _MARK, True)


def _expert_prefixes(model: nn.Module) -> list[str]:
    return [name + "." if name else "" for name, module in model.named_modules() if getattr(module, _MARK, False)]


def _is_expert(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(prefix) for prefix in prefixes)


def expert_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every expert parameter of ``model``."""
    prefixes = _expert_prefixes(model)
    return ((name, p) for name, p in model.named_parameters() if _is_expert(name, prefixes))


def non_expert_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every replicated parameter of ``model``."""
    prefixes = _expert_prefixes(model)
    return ((name, p) for name, p in model.named_parameters() if not _is_expert(name, prefixes))


def allreduce_non_expert_grads(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Average the gradients of the replicated parameters over ``group`` (DDP's job, without DDP).

    Call after backward on every rank. A parameter without a gradient on this rank
    contributes zeros, so every rank issues the same collectives.
    """
    size = dist.get_world_size(group)
    for _, param in non_expert_parameters(model):
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, group=group)
        param.grad.div_(size)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _copies(tensor: torch.Tensor) -> int:
    """How many ranks of the sum below hold this rank's shard of a DTensor (its Replicate mesh
    dimensions, e.g. b2 of an expert split over S ranks); 1 for a plain shard."""
    if not isinstance(tensor, DTensor):
        return 1
    sizes = [tensor.device_mesh.size(dim) for dim, p in enumerate(tensor.placements) if p.is_replicate()]
    return math.prod(sizes)


def clip_grad_norm_(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model whose experts are sharded over ``group``
    (every rank calls it): the norm is the one of the whole gradient, each expert shard counted
    once, the replicated gradients (identical on every rank: call after
    :func:`flexmoe.parallel.allreduce_non_expert_grads`) once. Without ``torch.distributed``
    it is the plain norm. Returns the norm before clipping."""
    # DTensor experts: this rank's shard (the all-reduce below adds the others', each once).
    expert_grads = [p.grad for _, p in expert_parameters(model) if p.grad is not None]
    expert = [_local(grad) for grad in expert_grads]
    replicated = [p.grad for _, p in non_expert_parameters(model) if p.grad is not None]
    grads = expert + replicated
    if not grads:
        return torch.zeros(())
    device = grads[0].device

    def squares(tensors: list[torch.Tensor], copies: list[int]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for tensor, count in zip(tensors, copies):
            total += tensor.detach().double().square().sum() / count
        return total

    expert_squares = squares(expert, [_copies(grad) for grad in expert_grads])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(expert_squares, group=group)
    norm = (expert_squares + squares(replicated, [1] * len(replicated))).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    with torch.no_grad():
        for grad in grads:
            grad.mul_(scale.to(grad.dtype))
    return norm.float()
