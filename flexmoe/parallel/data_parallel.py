"""Expert parameters vs replicated parameters, for DistributedDataParallel and plain all-reduce.

Expert parameters of a distributed MoE layer are marked; their gradients are already final
after backward (the exchange's backward routes every rank's contribution to the owner; see
:mod:`flexmoe.parallel.expert_parallel` for the mean-over-ranks convention). Everything else
(router, embeddings, ...) is replicated and needs the usual data-parallel gradient average:

    ddp_model = DistributedDataParallel(ignore_expert_parameters(model))
    # or, without DDP, after loss.backward():
    allreduce_non_expert_grads(model)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

_MARK = "_flexmoe_expert"


def mark_expert_parameters(module: nn.Module) -> None:
    """Mark every parameter of ``module`` as an expert parameter (not data-parallel reduced)."""
    for param in module.parameters():
        setattr(param, _MARK, True)


def is_expert_parameter(param: torch.Tensor) -> bool:
    return bool(getattr(param, _MARK, False))


def expert_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every expert parameter of ``model``."""
    return ((name, p) for name, p in model.named_parameters() if is_expert_parameter(p))


def non_expert_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every replicated parameter of ``model``."""
    return ((name, p) for name, p in model.named_parameters() if not is_expert_parameter(p))


def ignore_expert_parameters(model: nn.Module) -> nn.Module:
    """Tell DistributedDataParallel to skip the expert parameters; call before wrapping. Returns model."""
    names = [name for name, _ in expert_parameters(model)]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return model


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
